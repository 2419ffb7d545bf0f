"""r1pipeline.host names the machine a figure came from: the CPU model and its widest vector ISA,
which `platform.processor()` ("x86_64") does not tell apart."""

from r1pipeline import host

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7R13 Processor
flags\t\t: fpu sse2 avx avx2 fma
processor\t: 1
model name\t: AMD EPYC 7R13 Processor
flags\t\t: fpu sse2 avx avx2 fma avx512f
"""

ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes sha2
CPU implementer\t: 0x41
"""


def test_cpuinfo_gives_the_first_processors_model_and_flags():
    assert host._cpuinfo(X86) == ("AMD EPYC 7R13 Processor", {"fpu", "sse2", "avx", "avx2", "fma"})
    assert host._cpuinfo(ARM) == (None, {"fp", "asimd", "evtstrm", "aes", "sha2"})


def test_describe_names_this_machine():
    found = host.describe()
    assert found["cpu"] and found["cores"] >= 1 and found["torch"]
    assert isinstance(found["isa"], list) and set(found["isa"]) <= set(host._ISA)
    assert found["cpu"] in host.name()
