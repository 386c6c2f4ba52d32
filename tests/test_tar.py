"""vitcore.data.tar, the streaming tar reader, against webdataset's."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from vitcore.data.tar import iter_tar_samples


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_webdataset(fmt: int) -> None:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    deep = "/".join(["folder"] * 14)  # > 100 characters: ustar prefix, GNU long name or pax path
    files = {f"{deep}/a.jpg": b"1", f"{deep}/a.cls": b"2", "b.x.JPG": b"3" * 700, "__meta__/info.json": b"{}",
             "noext": b"4", "c.jpg": b"", "c.cls": b"5"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(_dir_info("adir"))
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ours = list(iter_tar_samples(io.BytesIO(buf.getvalue())))
    theirs = [{k: v for k, v in s.items() if k != "__url__"}
              for s in group_by_keys(tar_file_expander([{"url": "u", "stream": io.BytesIO(buf.getvalue())}]))]
    assert ours == theirs and [s["__key__"] for s in ours] == [f"{deep}/a", "b", "c"]
    with pytest.raises(tarfile.ReadError):
        list(iter_tar_samples(io.BytesIO(buf.getvalue()[:1500])))


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_corrupt_pax_record_is_an_error_not_a_hang() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("/".join(["long"] * 40) + "/a.jpg")  # a pax path record
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    data = bytearray(buf.getvalue())
    record = data.index(b" path=")  # "<len> path=...": make <len> zero
    start = record - len(str(int(data[record - 3:record])))
    data[start:record] = b"0" * (record - start)
    header = tarfile.TarInfo.frombuf(bytes(data[:512]), "utf-8", "surrogateescape")
    assert header.type == tarfile.XHDTYPE
    # the pax header's checksum does not cover its data, so the reader must judge the record itself
    with pytest.raises(tarfile.ReadError, match="pax"):
        list(iter_tar_samples(io.BytesIO(bytes(data))))


def test_only_public_webdataset_names_are_used() -> None:
    import ast

    root = Path(__file__).resolve().parents[1]
    for path in root.glob("vitcore/**/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("webdataset"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"
