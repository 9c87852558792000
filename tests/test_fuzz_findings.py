"""What fuzzing the parsers found (bench/fuzz.py), each as the clean error it now is.

The inputs are those the fuzzer saved (bench/fuzz_corpus/TARGET/), or the smallest form
of them; each parser must refuse them with its own error, naming the field or the file.
"""

from __future__ import annotations

import json

import pytest

from agent.bundle import _parse_manifest, decode_golden
from agent.errors import BundleError
from agent.modelrefs import check_model_files
from bench.fuzz_targets import CORPUS_DIR


def saved(target: str, name: str) -> bytes:
    return (CORPUS_DIR / target / name).read_bytes()


# ------------------------------------------------------------------ bundles


def test_manifest_nested_too_deeply_is_a_bundle_error() -> None:
    with pytest.raises(BundleError, match="not valid JSON: arrays or objects nested too deeply"):
        _parse_manifest(saved("bundle_manifest", "deep-nesting.json"), "b: manifest.json")


def test_manifest_integer_of_5000_digits_is_a_bundle_error() -> None:
    with pytest.raises(BundleError, match="not valid JSON: Exceeds the limit"):
        _parse_manifest(saved("bundle_manifest", "huge-integer.json"), "b: manifest.json")


def test_tolerance_beyond_a_float_names_the_field() -> None:
    with pytest.raises(BundleError, match=r"tolerance\.atol: expected a finite number, got 1000"):
        _parse_manifest(saved("bundle_manifest", "tolerance-beyond-float.json"), "b: manifest.json")
    doc = json.loads(saved("bundle_manifest", "tolerance-beyond-float.json"))
    doc["tolerance"] = {"rtol": float("nan")}
    with pytest.raises(BundleError, match=r"tolerance\.rtol: expected a finite number, got nan"):
        _parse_manifest(json.dumps(doc).encode(), "b: manifest.json")


def test_golden_case_whose_inputs_are_a_list_is_refused() -> None:
    with pytest.raises(BundleError, match="case 0: expected inputs and outputs, each an object"):
        decode_golden(saved("golden", "inputs-a-list.json"))


def test_golden_dimension_of_infinity_is_refused() -> None:
    with pytest.raises(BundleError, match="case 0 input x: cannot convert float infinity"):
        decode_golden(saved("golden", "infinite-dimension.json"))


def test_external_data_location_that_is_not_utf8_is_refused() -> None:
    """protobuf hands a proto2 string that is not UTF-8 back as bytes; the location comes out
    escaped, so it is never a member name, and is refused as outside the bundle."""
    model = saved("model_refs", "location-not-utf8.onnx")
    with pytest.raises(BundleError, match=r"keeps its data in 'we\\\\xe7ihts.bin', outside the bundle"):
        check_model_files(model, ("weights.bin",), "m.onnx")
