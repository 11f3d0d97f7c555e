"""The hardware class recorded with every result: CPU flags and GPU names."""

from __future__ import annotations

import pytest
import torch

from helpers import provenance, runtime

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Test CPU @ 2.00GHz
flags\t\t: fpu sse sse2 {flags}

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Test CPU @ 2.00GHz
flags\t\t: fpu sse sse2 {flags}
"""


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16", "cpu-avx512bf16-intel-sapphirerapids"),
        ("avx avx2 fma avx512f avx512bw avx512_vnni", "cpu-avx512-intel-sapphirerapids"),
        ("avx avx2 fma", "cpu-avx2-intel-sapphirerapids"),
        ("avx", "cpu-generic-intel-sapphirerapids"),
        ("", "cpu-generic-intel-sapphirerapids"),
    ],
)
def test_cpu_class_from_cpuinfo(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(flags=flags))
    assert runtime.hardware_class("cpu", cpuinfo=cpuinfo) == expected
    desc = runtime.cpu_description(cpuinfo)
    assert desc["cpu"] == "Test CPU @ 2.00GHz"
    assert (desc["cpu_vendor"], desc["cpu_family"], desc["cpu_model"]) == ("GenuineIntel", 6, 143)
    assert set(desc["cpu_flags"]) == set(flags.split()) & set(runtime.SIMD_FLAGS)


def test_unreadable_cpuinfo_is_generic(tmp_path):
    assert runtime.hardware_class("cpu", cpuinfo=tmp_path / "absent").startswith("cpu-generic-")


@pytest.mark.parametrize(
    "vendor, family, model, name, expected",
    [
        ("AuthenticAMD", 25, 17, "AMD EPYC", "amd-zen4"),  # Genoa
        ("AuthenticAMD", 25, 1, "AMD EPYC 7763 64-Core Processor", "amd-zen3"),  # Milan
        ("AuthenticAMD", 26, 2, "AMD EPYC", "amd-zen5"),  # Turin
        ("AuthenticAMD", 23, 49, "AMD EPYC 7B12", "amd-zen2"),  # Rome
        ("GenuineIntel", 6, 143, "Intel(R) Xeon(R) Platinum 8480+", "intel-sapphirerapids"),
        ("GenuineIntel", 6, 85, "Intel(R) Xeon(R) CPU @ 2.20GHz", "intel-skylake"),
        ("GenuineIntel", 6, 150, "Intel(R) Xeon(R) Processor", "intel-f6m150"),  # not in the table: its numbers
        ("", None, None, "Intel(R) Xeon(R) Processor", "intel-xeon"),  # no numbers: the product line
        ("", None, None, "AMD EPYC", "amd-epyc"),
    ],
)
def test_cpu_family_names_the_vendor_and_microarchitecture(vendor, family, model, name, expected):
    assert runtime.cpu_family_name(vendor, family, model, name) == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", "cuda-h100"),
        ("NVIDIA H100 PCIe", "cuda-h100"),
        ("NVIDIA H200", "cuda-h200"),
        ("NVIDIA A100-SXM4-40GB", "cuda-a100"),
        ("NVIDIA A100 80GB PCIe", "cuda-a100"),
        ("Tesla T4", "cuda-t4"),
        ("Tesla V100-SXM2-16GB", "cuda-v100"),
        ("NVIDIA L4", "cuda-l4"),
        ("NVIDIA GeForce RTX 4090", "cuda-rtx4090"),
        ("NVIDIA RTX A6000", "cuda-rtxa6000"),
        ("NVIDIA GeForce GTX 1080 Ti", "cuda-gtx1080"),
        ("", "cuda-unknown"),
    ],
)
def test_gpu_class_from_the_device_name(name, expected):
    assert runtime.gpu_class(name) == expected


def test_amd_gpus_are_rocm():
    assert runtime.gpu_class("AMD Instinct MI250X", rocm=True) == "rocm-mi250x"


def test_hardware_class_of_a_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.version, "hip", None)
    assert runtime.hardware_class("cuda") == "cuda-a100"
    assert runtime.hardware_class("cuda:0") == "cuda-a100"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.hardware_class("cuda") == "cuda-unavailable"


def test_every_provenance_record_has_the_hardware_class():
    record = provenance.provenance(device="cpu", notebook="01_x")
    assert record["hardware_class"] == runtime.hardware_class("cpu")
    assert record["hardware_class"].startswith("cpu-")
