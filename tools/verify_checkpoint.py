#!/usr/bin/env python
"""Verify checkpoints on disk: structure and every file's SHA-256 (``checksums.sha256``).

    python tools/verify_checkpoint.py ROOT            the checkpoint a resume would use (the tracker's,
                                                      else the newest iter_*), or ROOT itself when it is
                                                      one checkpoint directory or an export
    python tools/verify_checkpoint.py ROOT --all      every iter_* and release/ under ROOT, oldest first

One line per checkpoint::

    iter_0000004 ok 8 files 1.4 MB
    iter_0000002 ok (unverified: no checksums.sha256, saved before checksums) 7 files 1.4 MB
    iter_0000006 DAMAGED: __0_0.distcp: sha256 mismatch

Exit status: 0 every checkpoint checked is ok, 1 any is damaged, 2 bad usage (ROOT missing, or nothing
to check there). The same checks run when training resumes (a damaged checkpoint is skipped for the
newest complete one, with a warning) and when a checkpoint is loaded for inference or conversion.
A diffusers export of ``tools/convert_to_hf.py`` carries a ``checksums.sha256`` too (``sha256sum -c``
reads it); given as ROOT, its files are checked against it.
"""

import argparse
import os
import sys
import warnings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("root", metavar="ROOT", help="checkpoint root, one checkpoint directory, or an export")
    p.add_argument("--all", action="store_true", help="check every iter_* and release/ under ROOT")
    return p.parse_args(argv)


def _files(d):
    """(number of regular files, total bytes) under ``d``, recursively."""
    n = size = 0
    for dirpath, _, names in os.walk(d):
        for name in names:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                n += 1
                size += os.path.getsize(p)
    return n, size


def _mb(size):
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} KB"


def check_one(d, name=None):
    """(ok, line) for one checkpoint directory (or export directory with a manifest)."""
    from megatron_anyflow.checkpoint import store as ckpt

    name = name or os.path.basename(os.path.normpath(d))
    try:
        if os.path.isfile(os.path.join(d, ckpt.META)) or os.path.isfile(os.path.join(d, ckpt.DCP_INDEX)):
            ckpt.verify_checkpoint(d)
        elif ckpt.verify_checksums(d) is None:
            return False, f"{name} DAMAGED: neither {ckpt.META} nor {ckpt.CHECKSUMS} found: not a checkpoint"
    except ckpt.ChecksumError as err:
        return False, f"{name} DAMAGED: " + "; ".join(f"{os.path.relpath(p, d)}: sha256 mismatch" for p in err.files)
    except (FileNotFoundError, ckpt.CheckpointError) as err:
        msg = str(err)
        prefix = f"checkpoint {d}: "
        return False, f"{name} DAMAGED: {msg[len(prefix):] if msg.startswith(prefix) else msg}"
    except OSError as err:  # unreadable (permissions, I/O error): not verified, so not ok
        return False, f"{name} DAMAGED: cannot read {err.filename or d}: {err.strerror or err}"
    n, size = _files(d)
    note = "" if ckpt.has_checksums(d) else f" (unverified: no {ckpt.CHECKSUMS}, saved before checksums)"
    return True, f"{name} ok{note} {n} files {_mb(size)}"


def targets(root, every):
    """Checkpoint directories to check under ``root`` (raises ValueError with a usage message)."""
    from megatron_anyflow.checkpoint import store as ckpt

    if not os.path.isdir(root):
        raise ValueError(f"{root}: " + ("not a directory" if os.path.exists(root) else "no such directory"))
    is_ckpt = any(os.path.isfile(os.path.join(root, f)) for f in (ckpt.META, ckpt.DCP_INDEX))
    tags = sorted(ckpt._iter_dirs(root), key=lambda t: int(ckpt.ITER_DIR.match(t).group(1)))
    if os.path.isdir(os.path.join(root, "release")):
        tags.append("release")
    if not tags and (is_ckpt or os.path.isfile(os.path.join(root, ckpt.CHECKSUMS))):
        return [root]
    if every:
        if not tags:
            raise ValueError(f"{root}: no iter_* or release checkpoint there")
        return [os.path.join(root, t) for t in tags]
    try:
        tag = ckpt.read_tracker(root)
    except ckpt.CheckpointError:
        tag = None  # an unreadable tracker: check the newest checkpoint (a resume would fall back to it)
    if tag is None:
        if not tags:
            raise ValueError(f"{root}: no checkpoint there (no {ckpt.TRACKER}, iter_* or release)")
        tag = [t for t in tags if t != "release"][-1] if any(t != "release" for t in tags) else "release"
    return [os.path.join(root, tag)]


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    try:
        dirs = targets(args.root, args.all)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    damaged = 0
    for d in dirs:
        ok, line = check_one(d)
        damaged += not ok
        print(line, flush=True)
    return 1 if damaged else 0


if __name__ == "__main__":
    from megatron_anyflow.cli import main_guard

    main_guard(main)
