"""Storage you can trust: dcplan's file-system writer and reader, checksums and ``dcplan verify``.

* :mod:`dcplan.storage.writer`: :class:`FileSystemWriter`, torch's writer with an atomic
  commit (one ``rename`` of ``.metadata``), fsync before commit and a checksum per item.
* :mod:`dcplan.storage.checksum`: the checksum (xxHash XXH3-64), computed while writing,
  and the sidecar file that holds it.
* :mod:`dcplan.storage.reader`: :class:`FileSystemReader`, the safe reader: allow-list
  ``.metadata``, checksums verified, storage paths confined to the checkpoint directory.
* :mod:`dcplan.storage.verify`: what ``dcplan verify PATH`` checks.

See ``docs/storage.md``.
"""
