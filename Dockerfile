# megatron_anyflow on an NGC PyTorch image: CUDA, PyTorch, Transformer Engine, NVIDIA apex, DALI and
# flash-attention come with the base image; megatron-core and the rest come from PyPI.
#   docker build -t megatron_anyflow .
#   docker run --gpus all --ipc=host -it -v /data:/data megatron_anyflow
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /workspace/megatron_anyflow
COPY . .
# --no-deps for torch-dependent packages is not needed: the image's torch satisfies the requirements
# (a bare `torch` requirement is never listed in setup.py, so pip does not replace the image's build).
RUN pip install --no-cache-dir -e ".[test,data]" \
 && python -c "import megatron_anyflow, megatron_anyflow_kernels, transformer_engine; print('ok')"
ENV PYTHONUNBUFFERED=1
CMD ["bash"]
