"""Reading untrusted tar files with bounded memory: compressed streams decompressed a bounded
piece at a time, extended headers capped, sparse members refused (used by `grip_loop.corpus`)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zlib

#: Extended tar headers (pax, GNU long names) are read whole by tarfile before the member they
#: describe; over this size the tar file is not read further (counted `too_large`).
MAX_TAR_HEADER_BYTES = 1 << 20


_LONG_HEADERS = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class _TarHeaderTooLarge(tarfile.TarError):
    pass


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses, before tarfile reads them into memory, extended headers over
    MAX_TAR_HEADER_BYTES and sparse members (an unbounded chain of sparse-map blocks)."""

    def _proc_member(self, tf):
        if self.type in _LONG_HEADERS and self.size > MAX_TAR_HEADER_BYTES:
            raise _TarHeaderTooLarge(f"an extended header of {self.size} bytes")
        return super()._proc_member(tf)

    def _proc_sparse(self, tf):
        raise tarfile.ReadError("a sparse member (not supported)")

    def _proc_gnusparse_10(self, next, pax_headers, tf):
        raise tarfile.ReadError("a sparse member (not supported)")


#: Stream decompressors (all read with bounded output per call): tarfile's own "r|*" feeds a
#: whole 10 KiB compressed block to the decompressor at once, which can be GBs.
_MAGIC = (
    (b"\x1f\x8b", lambda fh: gzip.GzipFile(fileobj=fh, mode="rb")),
    (b"BZh", lambda fh: bz2.BZ2File(fh, "rb")),
    (b"\xfd7zXZ\x00", lambda fh: lzma.LZMAFile(fh, "rb")),
)
_READ_ERRORS = (OSError, EOFError, ValueError, RecursionError, zlib.error, lzma.LZMAError, tarfile.TarError)


def _decompressed(fh: io.BufferedReader):
    head = fh.peek(6)[:6]
    for magic, cls in _MAGIC:
        if head.startswith(magic):
            return cls(fh)
    return fh
