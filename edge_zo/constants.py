"""GGUF metadata keys and names edge-zo reads and writes, in one place.

Keys we share with llama.cpp are spelled as llama.cpp spells them (see gguf-py's
`gguf.constants.Keys`); keys of our own live under `adapter.sparse.`.
"""


class General:
    ARCHITECTURE = "general.architecture"
    TYPE = "general.type"
    NAME = "general.name"
    FILE_TYPE = "general.file_type"


class Adapter:
    TYPE = "adapter.type"                      # llama.cpp: "lora" for LoRA adapters
    SPARSE = "sparse"                          # our value of adapter.type


class Sparse:
    """Our own keys on a sparse adapter (sidecar or tuned deltas)."""

    FORMAT_VERSION = "adapter.sparse.format_version"
    BASE_MODEL_SHA256 = "adapter.sparse.base_model_sha256"
    ROLE = "adapter.sparse.role"               # "sidecar" or "deltas"
    MASK_METHOD = "adapter.sparse.mask.method"
    MASK_DENSITY = "adapter.sparse.mask.density"
    MASK_SCOPE = "adapter.sparse.mask.scope"
    CALIB_SOURCE = "adapter.sparse.calibration.source"
    CALIB_SHA256 = "adapter.sparse.calibration.sha256"
    CALIB_TOKENS = "adapter.sparse.calibration.tokens"
    SOURCE_SHA256 = "adapter.sparse.source_model_sha256"
    SPLIT = "adapter.sparse.split"             # "zero" or "keep"


SPARSE_FORMAT_VERSION = 1
IDX_SUFFIX = ".sparse_idx"
VAL_SUFFIX = ".sparse_val"
VALUE_MAX = 65504.0                            # largest F16, the type of every stored sparse value

# Weights llama.cpp multiplies inside each block; the default tuning targets.
BLOCK_MATMUL_SUFFIXES = (
    "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "attn_qkv.weight",
    "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
    "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight",
)
TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"
