"""Every file ``gce`` writes goes through this package: checked before any work, written atomically.

- :mod:`gce.io.paths`: output paths checked before the work (one-line errors);
- :mod:`gce.io.atomic`: atomic writes (temporary file, fsync, rename);
- :mod:`gce.io.checksums`: ``.sha256`` sidecars of files gce reads back as truth;
- :mod:`gce.io.strict_json`: JSON without NaN;
- :mod:`gce.io.processes`: whether the writer of a lock or temporary file is alive;
- :mod:`gce.io.locks`: lock files naming their holder (one writer at a time).

The rules (docs/reliability.md, "Outputs"):

- An output path is checked **before** the work that produces it, so a bad ``--out`` fails in a
  second instead of after an hour of evaluation. Problems are one line naming the path:
  an empty path, a directory, a FIFO / socket / block device (refused, never replaced), a path
  below a regular file, a read-only folder, or a file that is one of the run's own inputs
  (compared by inode, so hard links and symlinks are caught too).
- ``~`` is expanded in every path (:func:`user_path`).
- A regular file is replaced atomically: the bytes go to a temporary file in the same folder,
  are fsynced, then renamed over the target, so a crash never leaves a half-written file. A
  symlink is followed: its target is replaced, the link stays.
- A character device (``/dev/null``, ``/dev/stdout``, a terminal) is written into, as any Unix
  tool would; it is never renamed over.
- Files that ``gce`` later reads as truth (models, checkpoints, embeddings, indexes) get a
  ``<name>.sha256`` sidecar (:func:`write_checksum`) that :func:`verify_checksum` checks on load;
  a missing sidecar is a failed check.

Typical use in a command::

    out = check_output_file(args.out, what="--out", inputs=[args.checkpoint, dataset_root])
    ...                      # the long work
    write_json(out, metrics)  # strict JSON: NaN/inf become null

For writers that need a file name (``faiss.write_index``, ``torch.onnx.export``)::

    with atomic_path(out) as tmp:
        faiss.write_index(index, str(tmp))
    write_checksum(out)
"""

from gce.io.atomic import (
    atomic_path,
    fsync_dir,
    fsync_file,
    remove_stale_temporaries,
    replace_file,
    write_bytes,
    write_json,
    write_text,
)
from gce.io.checksums import CHECKSUM_SUFFIX, checksum_path, sha256_file, sha256_of, verify_checksum, write_checksum
from gce.io.locks import LockedError, hold_lock, try_lock
from gce.io.paths import (
    OutputError,
    check_output_dir,
    check_output_file,
    check_run_folder,
    file_argument,
    path_argument,
    refuse_foreign_dir,
    refuse_input_files,
    refuse_inputs,
    user_path,
)
from gce.io.processes import pid_alive
from gce.io.strict_json import dumps_strict, strict_json

__all__ = [
    "CHECKSUM_SUFFIX",
    "LockedError",
    "OutputError",
    "atomic_path",
    "check_output_dir",
    "check_output_file",
    "check_run_folder",
    "checksum_path",
    "dumps_strict",
    "file_argument",
    "fsync_dir",
    "fsync_file",
    "hold_lock",
    "path_argument",
    "pid_alive",
    "refuse_foreign_dir",
    "refuse_input_files",
    "refuse_inputs",
    "remove_stale_temporaries",
    "replace_file",
    "sha256_file",
    "sha256_of",
    "strict_json",
    "try_lock",
    "user_path",
    "verify_checksum",
    "write_bytes",
    "write_checksum",
    "write_json",
    "write_text",
]
