"""Open a zip or tar archive safely and read its members in memory, never extracting anything.

Every entry is checked before any is read, and one bad entry refuses the whole archive: absolute,
Windows or ``..`` names; links, devices and fifos; more than ``MAX_ARCHIVE_MEMBERS`` members (a zip's
count read from its end record, before the central directory is parsed); more than ``MAX_ARCHIVE_BYTES``
declared; a zip member inflating beyond its declared size. Corrupt data in a member is no attack: reading
it raises :class:`~serving.images.InvalidImage`, which the caller counts as unreadable.
"""

from __future__ import annotations

import mmap
import os
import posixpath
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from serving.images import InvalidImage

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, name length, extra length (30 bytes)
# Bomb caps: CIFAR-10 is 60,000 images and well under 1 GiB in any layout.
MAX_ARCHIVE_MEMBERS = 200_000
MAX_ARCHIVE_BYTES = 2 * 1024**3


def _is_zip(path: Path) -> bool:
    """Zip by its first bytes: ``is_zipfile`` alone also says yes for a tar whose last member is a zip."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head in (b"PK\x03\x04", b"PK\x05\x06"):
        return True
    return zipfile.is_zipfile(path) and not tarfile.is_tarfile(path)  # e.g. a self-extracting zip


class ArchiveError(ValueError):
    """The archive is unsafe, malformed, or not a dataset we understand."""


@dataclass(frozen=True)
class Member:
    """A regular file in the archive: normalised name, declared size, and the format's own record."""

    name: str
    size: int
    info: zipfile.ZipInfo | tarfile.TarInfo


class SafeArchive:
    """A checked, read-only view of a zip or tar archive. ``members`` lists regular files only."""

    def __init__(self, path: Path, *, max_members: int = MAX_ARCHIVE_MEMBERS, max_bytes: int = MAX_ARCHIVE_BYTES):
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._mm: mmap.mmap | None = None
        self._zip_pid = os.getpid()
        try:
            if _is_zip(self.path):
                self.members = self._open_zip(max_members, max_bytes)
            else:
                self.members = self._open_tar(max_members, max_bytes)
        except BaseException:
            self.close()
            raise

    @property
    def is_zip(self) -> bool:
        return self._zip is not None

    # --- opening and checking ------------------------------------------------
    def _open_zip(self, max_members: int, max_bytes: int) -> list[Member]:
        with open(self.path, "rb") as f:
            # Checked before ZipFile builds one object per entry of a possibly huge central directory.
            end = zipfile._EndRecData(f)  # noqa: SLF001 (stable since Python 2; no public API for it)
        if end and end[zipfile._ECD_ENTRIES_TOTAL] > max_members:  # noqa: SLF001
            self._too_many(max_members)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ArchiveError(f"{self.path} is a damaged zip archive ({exc}); download it again") from exc
        infos = self._zip.infolist()
        if len(infos) > max_members:
            self._too_many(max_members)
        members, total = [], 0
        for info in infos:
            name = self._check_name(info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                raise ArchiveError(f"{self.path}: member {info.filename!r} is a symlink; links are refused. "
                                   "Rebuild the archive with the files themselves")
            if kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
                raise ArchiveError(f"{self.path}: member {info.filename!r} is a device, fifo or socket; "
                                   "refusing the archive. Rebuild it with regular files only")
            if info.is_dir():
                continue
            total = self._add_size(total, info.file_size, max_bytes)
            members.append(Member(name, info.file_size, info))
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return members

    def _open_tar(self, max_members: int, max_bytes: int) -> list[Member]:
        try:
            self._tar = tarfile.open(self.path, "r:*")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError(f"{self.path} is neither a zip nor a tar archive ({exc}); give a .zip, .tar, "
                               ".tar.gz or the CIFAR-10 binary release (cifar-10-binary.tar.gz)") from exc
        members, total = [], 0
        try:
            for count, info in enumerate(self._tar, start=1):
                if count > max_members:
                    self._too_many(max_members)
                name = self._check_name(info.name)
                if info.issym() or info.islnk():
                    raise ArchiveError(f"{self.path}: member {info.name!r} is a link to {info.linkname!r}; links "
                                       "are refused. Rebuild the archive with the files themselves")
                if info.isdev():  # character and block devices, fifos
                    raise ArchiveError(f"{self.path}: member {info.name!r} is a device or fifo; refusing the "
                                       "archive. Rebuild it with regular files only")
                if info.isfile():
                    total = self._add_size(total, info.size, max_bytes)
                    members.append(Member(name, info.size, info))
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise ArchiveError(f"{self.path} is a damaged tar archive ({exc}); download it again") from exc
        return members

    def _too_many(self, max_members: int) -> None:
        raise ArchiveError(f"{self.path} has more than {max_members:,} members; refusing it as a possible archive "
                           "bomb (MAX_ARCHIVE_MEMBERS in training/data/archive.py)")

    def _add_size(self, total: int, size: int, max_bytes: int) -> int:
        total += size
        if total > max_bytes:
            raise ArchiveError(f"{self.path} would unpack to more than {max_bytes:,} bytes; refusing it as a possible "
                               "archive bomb (MAX_ARCHIVE_BYTES in training/data/archive.py)")
        return total

    def _check_name(self, name: str) -> str:
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or "\\" in name:
            raise ArchiveError(f"{self.path}: member {name!r} has an absolute or Windows path; refusing the "
                               "archive. Rebuild it with relative paths such as cat/0001.png")
        if ".." in name.split("/"):
            raise ArchiveError(f"{self.path}: member {name!r} contains '..' (path traversal); refusing the "
                               "archive. Rebuild it with plain relative paths")
        return posixpath.normpath(name)

    # --- reading ----------------------------------------------------------------
    def read(self, member: Member, limit: int | None = None) -> bytes:
        """The member's bytes; :class:`InvalidImage` when its data is corrupt or over ``limit`` bytes."""
        if limit is not None and member.size > limit:
            raise InvalidImage(f"file is {member.size:,} bytes, over the {limit:,}-byte limit for one file")
        if self._zip is not None:
            return self._read_zip(member.info)  # type: ignore[arg-type]
        try:
            f = self._tar.extractfile(member.info)  # type: ignore[union-attr,arg-type]
            data = f.read() if f else b""
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise ArchiveError(f"{self.path}: cannot read member {member.name!r} ({exc}); the archive is "
                               "damaged, download it again") from exc
        if len(data) != member.size:
            raise InvalidImage(f"member is {len(data)} bytes, {member.size} declared: truncated")
        return data

    def _read_zip(self, info: zipfile.ZipInfo) -> bytes:
        # From the memory map: faster than ZipFile.read for small members, no file position to share
        # with forked workers, and the declared size bounds the output so a deflate bomb cannot expand.
        if info.flag_bits & 0x1:
            raise InvalidImage("member is encrypted; give an unencrypted archive")
        mm, offset = self._mm, info.header_offset
        assert mm is not None
        if offset + _LOCAL_HEADER.size > len(mm):
            raise ArchiveError(f"{self.path}: member {info.filename!r} points outside the file; the archive is "
                               "damaged or forged, download it again")
        signature, name_len, extra_len = _LOCAL_HEADER.unpack_from(mm, offset)
        start = offset + _LOCAL_HEADER.size + name_len + extra_len
        if signature != b"PK\x03\x04" or start + info.compress_size > len(mm):
            raise ArchiveError(f"{self.path}: member {info.filename!r} has a bad local header; the archive is "
                               "damaged or forged, download it again")
        if info.compress_type == zipfile.ZIP_STORED:
            data = mm[start:start + min(info.compress_size, info.file_size + 1)]
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            try:
                data = zlib.decompressobj(-15).decompress(mm[start:start + info.compress_size], info.file_size + 1)
            except zlib.error as exc:
                raise InvalidImage(f"corrupt compressed data: {exc}") from exc
        else:  # bzip2, lzma: rare; zipfile reads at most file_size bytes and checks the CRC
            data = self._zip_fallback(info)
        if len(data) > info.file_size:
            raise ArchiveError(f"{self.path}: member {info.filename!r} inflates beyond its declared size of "
                               f"{info.file_size:,} bytes; refusing it as a zip bomb")
        if len(data) < info.file_size or zlib.crc32(data) != info.CRC:
            raise InvalidImage("corrupt member: data does not match its size or CRC")
        return data

    def _zip_fallback(self, info: zipfile.ZipInfo) -> bytes:
        if self._zip_pid != os.getpid():  # forked worker: never share the parent's file position
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        try:
            with self._zip.open(info) as f:  # type: ignore[union-attr]
                return f.read(info.file_size + 1)
        except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError) as exc:
            raise InvalidImage(f"cannot read member: {exc}") from exc

    def close(self) -> None:
        for handle in (self._zip, self._tar, self._mm):
            if handle is not None:
                handle.close()

    def __enter__(self) -> "SafeArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
