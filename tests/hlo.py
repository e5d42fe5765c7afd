"""Reading a compiled program's HLO text (`jax.stages.Compiled.as_text()`) in the tests."""
import re

_COMPUTATION = re.compile(r"^%(\S+) \(.*?\n(.*?)^}", re.MULTILINE | re.DOTALL)
_YNN_FUSION_CALL = re.compile(r"calls=%([^\s,]+).*\"kind\":\"__ynn_fusion\"")


def ynn_fused_opcodes(hlo_text: str, opcodes=("convolution", "dot", "reduce")) -> dict[str, int]:
  """How many of XLA:CPU's YNNPACK fusions hold each of `opcodes` (a fusion holding two counts for both)."""
  computations = dict(_COMPUTATION.findall(hlo_text))
  bodies = [computations[name] for name in _YNN_FUSION_CALL.findall(hlo_text)]
  return {op: sum(f" {op}(" in body for body in bodies) for op in opcodes}
