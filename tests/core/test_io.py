"""Hostile and broken adapter directories: each is refused with a peftkit error naming the problem,
raised by peftkit itself (not from deep inside a library), with the model and the files unchanged.

Also the save side: an incomplete, empty or non-finite adapter is never written, and what is written
reads back key for key and bit for bit. Issue 10; docs/security.md describes the stance.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from contract_rows import all_rows, call
from peftkit.core import io as adapter_io
from peftkit.errors import (
    AdapterFileError,
    AdapterMismatchError,
    ConfigError,
    NoTargetMatchedError,
    PeftkitError,
)

A_KEY = "base_model.model.proj.lora_A.weight"
B_KEY = "base_model.model.proj.lora_B.weight"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.proj(x)))


def fresh(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def trained_adapter(seed: int = 0) -> Net:
    """A LoRA adapter whose B is non-zero (a fresh LoRA's B is all zeros and hides broken loads)."""
    model = fresh(seed)
    peftkit.inject(model, peftkit.make_config("lora", r=2, lora_alpha=4, target_modules=["proj"]))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param))
    return model


@pytest.fixture
def good(tmp_path: Path) -> Path:
    directory = tmp_path / "good"
    peftkit.save_adapter(trained_adapter(), directory)
    return directory


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def raised_by_peftkit(error: BaseException) -> bool:
    """The innermost frame that raised is peftkit's own code: the user sees a message, not a
    traceback ending in safetensors, json or torch."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}peftkit{os.sep}" in frames[-1].filename


def no_chained_traceback(error: BaseException) -> bool:
    return error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def refused(directory: Path, error: type[BaseException], *phrases: str, **load_options) -> BaseException:
    """Load ``directory`` onto a fresh model: it must raise ``error`` whose message holds ``phrases``,
    leave the model exactly as it was, and change no file in ``directory``."""
    model = fresh(1)
    before = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    files = files_of(directory)
    with pytest.raises(error) as info:
        peftkit.load_adapter(model, directory, **load_options)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert isinstance(info.value, PeftkitError), f"{type(info.value).__name__} is not a peftkit error"
    assert raised_by_peftkit(info.value), traceback.format_exception(info.value)
    assert [type(m) for m in model.modules()] == types and "_peftkit" not in model.__dict__
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert files_of(directory) == files
    return info.value


# --------------------------------------------------------------------------- safetensors files


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def with_header(change):
    def rewrite(raw: bytes) -> bytes:
        header, data = _split(raw)
        change(header)
        return _join(header, data)

    return rewrite


def _overlap(header: dict) -> None:
    header[B_KEY]["data_offsets"] = header[A_KEY]["data_offsets"]


def _set(key: str, **values):
    return lambda header: header[key].update(values)


CORRUPT_WEIGHTS = {
    "empty file": lambda raw: b"",
    "truncated to half": lambda raw: raw[: len(raw) // 2],
    "cut inside the length": lambda raw: raw[:5],
    "header length beyond the file": lambda raw: struct.pack("<Q", len(raw) * 4) + raw[8:],
    "oversized header": lambda raw: struct.pack("<Q", 2**62) + raw[8:],
    "overlapping offsets": with_header(_overlap),
    "offsets past the data": with_header(_set(B_KEY, data_offsets=[48, 4096])),
    "dtype too wide for its bytes": with_header(_set(A_KEY, dtype="F64")),
    "unknown dtype": with_header(_set(A_KEY, dtype="F99")),
    "shape disagreeing with the bytes": with_header(_set(A_KEY, shape=[3, 6])),
    "header not JSON": lambda raw: raw[:8] + b"\x00" + raw[9:],
    "metadata value not a string": with_header(lambda h: h["__metadata__"].update(x=5)),
}


@pytest.mark.parametrize("case", list(CORRUPT_WEIGHTS))
def test_corrupt_safetensors_files_are_refused(good, case):
    path = good / adapter_io.WEIGHTS_NAME
    path.write_bytes(CORRUPT_WEIGHTS[case](path.read_bytes()))
    refused(good, AdapterFileError, str(path), "truncated or corrupt")


def _rewrite_tensors(directory: Path, change) -> None:
    tensors, metadata = adapter_io.read_adapter_tensors(directory)
    change(tensors)
    from safetensors.torch import save_file

    save_file(tensors, str(directory / adapter_io.WEIGHTS_NAME), metadata=metadata)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_a_tensor_of_the_wrong_kind_of_dtype_is_refused(good, dtype):
    _rewrite_tensors(good, lambda t: t.update({A_KEY: t[A_KEY].to(dtype)}))
    refused(good, AdapterFileError, A_KEY, str(dtype), "wrong kind of dtype")


def test_another_float_width_is_converted(good):
    # a bf16 adapter onto an fp32 model is ordinary; the values round-trip through bf16
    _rewrite_tensors(good, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    model = peftkit.load_adapter(fresh(), good)
    loaded = peftkit.adapter_state_dict(model)
    assert loaded[A_KEY].dtype == torch.float32
    assert torch.equal(loaded[A_KEY], adapter_io.read_adapter_tensors(good)[0][A_KEY].float())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_naming_the_keys(good, value):
    def poison(tensors):
        tensors[B_KEY] = tensors[B_KEY].clone()
        tensors[B_KEY][1, 0] = value

    _rewrite_tensors(good, poison)
    refused(good, AdapterFileError, "non-finite", B_KEY)
    # strict=False loads what fits, but never a non-finite tensor
    refused(good, AdapterFileError, "non-finite", strict=False)


def test_keys_for_modules_that_do_not_exist_are_refused(good):
    _rewrite_tensors(good, lambda t: t.update({"base_model.model.nowhere.lora_A.weight": torch.zeros(2, 6)}))
    refused(
        good,
        AdapterMismatchError,
        "1 unexpected key(s)",
        "base_model.model.nowhere.lora_A.weight",
        "strict=False",
    )


def test_a_missing_key_is_refused(good):
    _rewrite_tensors(good, lambda t: t.pop(B_KEY))
    refused(good, AdapterMismatchError, "1 missing key(s)", B_KEY)


def test_shapes_that_do_not_match_are_refused_naming_module_and_shapes(good):
    _rewrite_tensors(good, lambda t: t.update({A_KEY: torch.zeros(3, 6), B_KEY: torch.zeros(5, 3)}))
    refused(
        good, AdapterMismatchError, "proj: saved (3, 6) vs model (2, 6) (lora_A.weight)", "different rank"
    )


def test_a_weights_path_that_is_not_a_file_is_refused_without_reading_it(good, tmp_path):
    weights = good / adapter_io.WEIGHTS_NAME
    weights.unlink()
    weights.mkdir()
    refused(good, AdapterFileError, "not a regular file")
    weights.rmdir()
    os.mkfifo(weights)  # reading a FIFO would block forever
    refused(good, AdapterFileError, "not a regular file")
    weights.unlink()
    weights.symlink_to("/dev/zero")  # endless
    refused(good, AdapterFileError, "not a regular file")


def test_a_symlink_to_a_regular_file_outside_is_followed_as_the_hub_cache_needs(good, tmp_path):
    # the Hugging Face cache links snapshots/<rev>/adapter_model.safetensors to ../../blobs/<hash>
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    shutil.move(good / adapter_io.WEIGHTS_NAME, blob)
    (good / adapter_io.WEIGHTS_NAME).symlink_to(os.path.relpath(blob, good))
    model = peftkit.load_adapter(fresh(), good)
    assert torch.equal(
        peftkit.adapter_state_dict(model)[A_KEY], adapter_io.read_adapter_tensors(good)[0][A_KEY]
    )


# ------------------------------------------------------------------------- adapter_config.json


def _edit_config(directory: Path, change) -> None:
    path = directory / adapter_io.CONFIG_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


BROKEN_CONFIG_TEXT = {
    "invalid JSON": (b"{peft_type: LORA", "not valid JSON"),
    "cut short": (None, "not valid JSON"),
    "not UTF-8": (b'{"peft_type": "LORA", "r": "\xff\xfe"}', "not valid JSON"),
    "deeply nested": (b"[" * 200_000 + b"]" * 200_000, "not valid JSON"),
    "a JSON array": (b'["LORA", 8]', "JSON object of config keys, got a JSON array"),
    "JSON null": (b"null", "got a JSON null"),
    "empty object": (b"{}", "needs peft_type"),
}


@pytest.mark.parametrize("case", list(BROKEN_CONFIG_TEXT))
def test_config_files_that_are_not_a_config_are_refused(good, case):
    path = good / adapter_io.CONFIG_NAME
    text, phrase = BROKEN_CONFIG_TEXT[case]
    path.write_bytes(path.read_bytes()[:40] if text is None else text)
    error = refused(good, AdapterFileError, str(path), phrase)
    assert no_chained_traceback(error)  # no JSON decoder traceback under the message


def test_an_oversized_config_is_refused_before_it_is_read(good):
    path = good / adapter_io.CONFIG_NAME
    os.truncate(path, adapter_io.MAX_CONFIG_BYTES + 1)  # sparse: costs no disk and no time
    refused(good, AdapterFileError, "more than any adapter config")


@pytest.mark.parametrize(
    "change, phrase",
    [
        (lambda c: c.pop("peft_type"), "needs peft_type"),
        (lambda c: c.update(peft_type=7), "got 7"),
        (lambda c: c.update(peft_type="SUPER_LORA"), "no PEFT method registered as 'SUPER_LORA'"),
    ],
    ids=["missing peft_type", "peft_type not a string", "unknown method"],
)
def test_a_config_without_a_known_method_is_refused(good, change, phrase):
    _edit_config(good, change)
    refused(good, AdapterFileError, phrase)


@pytest.mark.parametrize(
    "change, phrases",
    [
        (lambda c: c.update(r=-1), ["r: must be a positive integer, got -1"]),
        (lambda c: c.update(r="eight"), ["r: must be a positive integer, got 'eight'"]),
        (lambda c: c.update(lora_dropout=1.5), ["lora_dropout"]),
        (
            lambda c: c.update(target_modules=5),
            ["target_modules: expected a list of names or a regex string"],
        ),
        (lambda c: c.update(target_modules="(unclosed"), ["not a valid regular expression"]),
        (lambda c: c.update(r=0, lora_alpha=-2), ["r: must be a positive integer", "lora_alpha"]),
        (lambda c: c.update(use_qalora=True), ["use_qalora=True is a reference-library feature"]),
    ],
    ids=[
        "negative rank",
        "rank not a number",
        "dropout out of range",
        "targets not a list",
        "bad regex",
        "every problem at once",
        "unimplemented feature switched on",
    ],
)
def test_values_out_of_range_are_refused_naming_the_file_and_every_field(good, change, phrases):
    _edit_config(good, change)
    refused(good, ConfigError, str(good / adapter_io.CONFIG_NAME), *phrases)


def test_keys_from_a_newer_version_warn_and_the_adapter_loads(good):
    _edit_config(good, lambda c: c.update(lora_future_option=True, quantum_rank=3))
    expected = adapter_io.read_adapter_tensors(good)[0]
    with pytest.warns(
        UserWarning, match=r"ignoring unknown LORA config keys \['lora_future_option', 'quantum_rank'\]"
    ):
        model = peftkit.load_adapter(fresh(), good)
    assert all(torch.equal(peftkit.adapter_state_dict(model)[k], v) for k, v in expected.items())


class OpenedFiles:
    """Every file path the interpreter opens while active (PEP 578 audit hooks cannot be removed,
    so one hook is installed for the session and switched on and off)."""

    paths: list[str] = []
    active = False
    installed = False

    def __enter__(self) -> list[str]:
        if not OpenedFiles.installed:
            sys.addaudithook(OpenedFiles._hook)
            OpenedFiles.installed = True
        OpenedFiles.paths = []
        OpenedFiles.active = True
        return OpenedFiles.paths

    def __exit__(self, *exc) -> None:
        OpenedFiles.active = False

    @staticmethod
    def _hook(event: str, args: tuple) -> None:
        if OpenedFiles.active and event == "open" and isinstance(args[0], str):
            OpenedFiles.paths.append(os.path.realpath(args[0]))


def test_paths_in_the_config_never_make_loading_read_outside_the_adapter_directory(good, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "tokenizer.json").write_text("{}")
    escape = os.path.relpath(secret, good)  # "../secret"
    _edit_config(good, lambda c: c.update(base_model_name_or_path=escape, revision="../../main"))
    peftkit.load_adapter(fresh(), good)  # warm up: imports open library files
    with OpenedFiles() as opened:
        model = peftkit.load_adapter(fresh(), good)
    outside = [
        p
        for p in opened
        if not p.startswith(os.path.realpath(good))
        and "site-packages" not in p
        and not p.startswith(sys.prefix)
        and not p.startswith(sys.base_prefix)
    ]
    assert outside == [], outside
    # the recorded source is a label, kept as written
    assert peftkit.adapter_config(model, "default").base_model_name_or_path == escape


def test_a_prompt_tuning_config_naming_a_tokenizer_outside_is_not_followed_on_a_default_load(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    def bert():
        torch.manual_seed(0)
        return BertForSequenceClassification(
            BertConfig(
                vocab_size=50,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=37,
                max_position_embeddings=16,
            )
        )

    model = bert()
    peftkit.inject(model, peftkit.make_config("prompt_tuning", num_virtual_tokens=4))
    directory = tmp_path / "prompt"
    peftkit.save_adapter(model, directory)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _edit_config(
        directory,
        lambda c: c.update(
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text="hello",
            tokenizer_name_or_path=os.path.relpath(outside, directory),
        ),
    )
    peftkit.load_adapter(bert(), directory)
    with OpenedFiles() as opened:
        peftkit.load_adapter(
            bert(), directory
        )  # is_trainable=False: the init is skipped, the file's tensors used
    assert not [p for p in opened if p.startswith(os.path.realpath(outside))]


@pytest.mark.parametrize("field", ["target_modules", "modules_to_save"])
def test_module_names_with_path_syntax_match_no_module(good, field):
    # module names are looked up in the model, never opened as files
    _edit_config(good, lambda c: c.update({field: ["../../../etc/passwd"]}))
    refused(good, NoTargetMatchedError, "'../../../etc/passwd' matched 0 modules")


# ------------------------------------------------------------------------------------ pickles


class CreatesAFile:
    """Unpickling this creates ``path``: the shape of a pickle payload that runs code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_adapter(directory: Path, marker: Path) -> Path:
    tensors = adapter_io.read_adapter_tensors(directory)[0]
    (directory / adapter_io.WEIGHTS_NAME).unlink()
    path = directory / "adapter_model.bin"
    torch.save({**tensors, "payload": CreatesAFile(marker)}, path)
    return path


def test_the_payload_really_runs_code_when_unpickled_unsafely(good, tmp_path):
    # so that the refusals below prove something: a plain torch.load creates the file
    marker = tmp_path / "created-by-unsafe-load"
    path = _pickle_adapter(good, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_pickle_is_refused_by_default_without_running_it(good, tmp_path):
    marker = tmp_path / "pwned"
    path = _pickle_adapter(good, marker)
    refused(good, AdapterFileError, str(path), "pickle file", "allow_pickle=True")
    assert not marker.exists()


def test_allow_pickle_reads_weights_only_and_refuses_the_payload(good, tmp_path):
    marker = tmp_path / "pwned"
    _pickle_adapter(good, marker)
    error = refused(
        good, AdapterFileError, "weights_only=True", "Convert it to safetensors", allow_pickle=True
    )
    assert not marker.exists()
    assert no_chained_traceback(error)


def test_allow_pickle_loads_a_pickle_of_plain_tensors(good):
    expected = adapter_io.read_adapter_tensors(good)[0]
    (good / adapter_io.WEIGHTS_NAME).unlink()
    torch.save(expected, good / "adapter_model.bin")
    refused(good, AdapterFileError, "pickle file")
    model = peftkit.load_adapter(fresh(), good, allow_pickle=True)
    assert all(torch.equal(peftkit.adapter_state_dict(model)[k], v) for k, v in expected.items())


# -------------------------------------------------------------------------------- save side


def test_saving_after_a_targeted_module_was_replaced_is_refused_and_changes_nothing(good):
    model = trained_adapter()
    files = files_of(good)
    model.proj = nn.Linear(6, 5)  # the adapter layer (and its tensors) are gone
    with pytest.raises(AdapterMismatchError, match=r"1 module\(s\) that no longer carry it: \['proj'\]"):
        peftkit.save_adapter(model, good)
    assert files_of(good) == files


def test_saving_after_a_module_to_save_was_deleted_is_refused(tmp_path):
    model = fresh()
    peftkit.inject(model, peftkit.make_config("lora", r=2, target_modules=["proj"], modules_to_save=["out"]))
    model.out = nn.Linear(5, 3)
    with pytest.raises(AdapterMismatchError, match=r"\['out'\]"):
        peftkit.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "tensors, phrase",
    [
        ({}, "no tensors at all"),
        ({A_KEY: torch.zeros(0, 6), B_KEY: torch.zeros(5, 0)}, "only empty tensors (2)"),
    ],
    ids=["no tensors", "only empty tensors"],
)
def test_saving_an_empty_adapter_is_refused(good, monkeypatch, tensors, phrase):
    # a method bug or a model surgery that leaves nothing to save must not produce a silent no-op file
    monkeypatch.setattr(adapter_io, "adapter_state_dict", lambda *args: tensors)
    files = files_of(good)
    with pytest.raises(AdapterMismatchError, match="nothing was saved") as info:
        peftkit.save_adapter(trained_adapter(), good)
    assert phrase in str(info.value)
    assert files_of(good) == files


def test_an_adapter_with_some_empty_tensors_is_saved(good, monkeypatch):
    # AdaLoRA can prune a module to rank 0; the reference library saves and loads those empty tensors
    tensors = {
        A_KEY: torch.zeros(0, 6),
        B_KEY: torch.ones(5, 2),
        "base_model.model.proj.lora_E": torch.ones(2, 1),
    }
    monkeypatch.setattr(adapter_io, "adapter_state_dict", lambda *args: tensors)
    peftkit.save_adapter(trained_adapter(), good)
    saved = adapter_io.read_adapter_tensors(good)[0]
    assert saved.keys() == tensors.keys() and saved[A_KEY].shape == (0, 6)


def test_saving_non_finite_weights_is_refused_and_changes_nothing(good):
    model = trained_adapter()
    with torch.no_grad():
        dict(model.named_parameters())["proj.adapters.default.lora_B.weight"][0, 0] = float("nan")
    files = files_of(good)
    with pytest.raises(AdapterFileError, match="non-finite"):
        peftkit.save_adapter(model, good)
    assert files_of(good) == files


@pytest.mark.parametrize("damage", ["drop a key", "flip a value", "truncate"])
def test_a_written_file_that_reads_back_differently_replaces_nothing(good, monkeypatch, damage):
    real_save = adapter_io.save_file

    def lossy_save(tensors, path, metadata=None):
        tensors = dict(tensors)
        if damage == "drop a key":
            tensors.pop(B_KEY)
        elif damage == "flip a value":
            tensors[A_KEY] = tensors[A_KEY].clone()
            tensors[A_KEY].view(-1)[0] += 1
        real_save(tensors, path, metadata=metadata)
        if damage == "truncate":
            os.truncate(path, os.path.getsize(path) - 8)

    monkeypatch.setattr(adapter_io, "save_file", lossy_save)
    files = files_of(good)
    with pytest.raises(AdapterFileError, match="nothing was replaced"):
        peftkit.save_adapter(trained_adapter(seed=5), good)
    assert files_of(good) == files
    assert sorted(p.name for p in good.iterdir()) == sorted(files)  # no temporary left behind


def _row_cases():
    for row in all_rows():
        yield pytest.param(row, id=row.name)


@pytest.mark.parametrize("row", list(_row_cases()))
def test_every_method_saves_every_key_and_reads_it_back_equal(row, tmp_path):
    kind = row.kinds[0]
    model, x = row.build(kind)
    if row.inject is None:
        peftkit.inject(model, row.config(kind))
    else:  # an init that starts from data
        row.inject(model, row.config(kind), x)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(2):  # move every tensor away from its init (a zero B would compare equal to anything zero)
        optimizer.zero_grad()
        call(model, x).square().mean().backward()
        optimizer.step()
    # an init no reader can redo from the file (CorDA's data) always saves its portable form
    portable = peftkit.adapter_config(model).saves_portable()
    expected = {k: v.detach().cpu() for k, v in peftkit.adapter_state_dict(model, portable=portable).items()}
    peftkit.save_adapter(model, tmp_path / "a")
    saved, metadata = adapter_io.read_adapter_tensors(tmp_path / "a")
    assert saved.keys() == expected.keys() and expected
    for key, tensor in expected.items():
        assert saved[key].numel() > 0, key
        assert torch.equal(saved[key], tensor), key
    assert metadata[adapter_io.FINGERPRINT_KEY]
    # and it loads back onto a fresh base, tensor for tensor
    base, _ = row.build(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a base weight the adapter carries
        peftkit.load_adapter(base, tmp_path / "a")
    loaded = peftkit.adapter_state_dict(base)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k].cpu(), v) for k, v in expected.items())
