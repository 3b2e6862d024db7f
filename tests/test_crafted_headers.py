"""Every header a crafted file carries is checked against the file's own size and tensors before anything is
allocated: a few KB of file never costs GBs, and the refusal is one line."""

import json
import struct

import pytest

from reir.errors import ReirError


def flat_index(tmp_path, factory="Flat", count=28, dim=8):
    """A small index and its id map, written by REIR: ``(index path, its bytes)``."""
    import torch

    from reir.retrieval.index import Index

    vectors = torch.randn(count, dim, generator=torch.Generator().manual_seed(0))
    index = Index.build(torch.nn.functional.normalize(vectors, dim=-1), [f"/data/{i}.png" for i in range(count)],
                        factory=factory)
    path = tmp_path / f"{factory}.faiss"
    index.save(path)
    return path, path.read_bytes()


def write_index(path, data: bytes) -> None:
    """``data`` at ``path`` with its id map re-bound to it (both files crafted): the layout check must refuse it."""
    from fuzz_inputs import crafted_pair
    from reir.retrieval.index import id_map_path

    path.write_bytes(data)
    id_map_path(path).write_bytes(crafted_pair(id_map_path(path).read_bytes(), data))


def claims(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack("<Q", value) + data[offset + 8:]


def test_a_flat_index_claiming_a_huge_array_is_refused_unread(tmp_path):
    """Before: the 941-byte file below cost 1 GiB before FAISS noticed it was short."""
    from reir.retrieval.index import Index

    path, data = flat_index(tmp_path)
    assert len(data) == 941 and data[:4] == b"IxFI"
    write_index(path, claims(data, 37, 2**28))
    with pytest.raises(ReirError, match="claims 268,435,456 elements, more than the 941-byte file holds"):
        Index.load(path)
    write_index(path, data[:4] + struct.pack("<i", 9) + data[8:])
    with pytest.raises(ReirError, match="dimension 9, where its id map says 8"):
        Index.load(path)
    write_index(path, data[:8] + struct.pack("<q", 2**40) + data[16:])
    with pytest.raises(ReirError, match="1,099,511,627,776 vectors, where its id map lists 28"):
        Index.load(path)
    write_index(path, data[:500])
    with pytest.raises(ReirError, match=r"claims 224 elements|ends"):
        Index.load(path)


def test_an_hnsw_index_claiming_long_arrays_is_refused_unread(tmp_path):
    from reir.retrieval.index import Index

    path, data = flat_index(tmp_path, "HNSW8")
    first_array = 37
    write_index(path, claims(data, first_array, 2**27))
    with pytest.raises(ReirError, match="level probabilities claims 134,217,728 elements"):
        Index.load(path)
    import torch

    _, ids = Index.load(flat_index(tmp_path, "HNSW8")[0]).search(torch.eye(8)[:1], 3)  # a true file still opens
    assert ids.shape == (1, 3)


def test_id_maps_and_metadata_nested_100000_deep_are_one_line_errors(tmp_path):
    """Before: a RecursionError traceback."""
    from reir.fileio import save_tensors
    from reir.model.files import load_model
    from reir.retrieval.database import load_database
    from reir.retrieval.index import Index, id_map_path

    path, _ = flat_index(tmp_path)
    id_map_path(path).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ReirError, match="nests its JSON deeper"):
        Index.load(path)
    deep = "[" * 100_000 + "]" * 100_000
    import torch

    for loader in (load_database, load_model):
        file = tmp_path / f"{loader.__name__}.safetensors"
        save_tensors(file, {"x": torch.zeros(2)}, {"format": "x"})
        raw = file.read_bytes()
        header_size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_size])
        header["__metadata__"]["reir"] = deep
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        file.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + header_size:])
        with pytest.raises(ReirError, match="nested too deeply"):
            loader(file)


def test_a_model_header_claiming_a_huge_network_is_refused_before_it_is_built(served_model, tmp_path):
    """Before: meta_class_size 2**20 in a small model file cost 2.86 GB; projection 10**12 was a traceback."""
    import resource

    from reir.fileio import load_tensors, save_tensors
    from reir.model.files import load_model

    state, meta = load_tensors(served_model.model)
    state = {k: t.clone() for k, t in state.items()}
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for field, value in (("meta_class_size", 2**20), ("projection", 10**12)):
        crafted = tmp_path / f"{field}.safetensors"
        save_tensors(crafted, state, dict(meta, model=dict(meta["model"], **{field: value})))
        with pytest.raises(ReirError, match="does not match its recorded configuration") as refused:
            load_model(crafted)
        assert "\n" not in str(refused.value)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024 < 64  # MiB
    save_tensors(tmp_path / "true.safetensors", state, meta)
    assert load_model(tmp_path / "true.safetensors").embedding_shape == (4, 3)  # a true header still loads


def test_an_hnsw_graph_linking_outside_its_vectors_is_refused(tmp_path):
    """A neighbour id past the last vector would make FAISS read outside its storage while searching."""
    from reir.retrieval.faiss_layout import _Cursor
    from reir.retrieval.index import Index

    path, data = flat_index(tmp_path, "HNSW8")
    cursor = _Cursor(data, path)
    cursor.take(37)
    for element in (8, 4, 4, 8, 4):
        cursor.array(element)
    start, length = cursor.last
    assert length > 0
    write_index(path, data[:start] + struct.pack("<i", 10**6) + data[start + 4:])
    with pytest.raises(ReirError, match=r"links to vectors outside 0\.\.27"):
        Index.load(path)
