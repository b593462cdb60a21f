"""Object storage behind one small protocol (:mod:`.base`), and its backends: S3-compatible
storage (:mod:`.s3`), a folder (:mod:`.fs`) and memory for unit tests (:mod:`.memory`).
:mod:`.url` turns ``--storage`` into a backend."""
