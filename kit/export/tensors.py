"""How each tensor is stored in a GGUF file for a chosen --quant, and the writer's shared steps."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import gguf
import numpy as np
import torch

from kit.core import options
from kit.core.errors import KitError

QUANTS = options.EXPORT_QUANTS
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise KitError(f"--quant {quant}: choose {', '.join(QUANTS)}")


def add_tensor(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, quant: str) -> None:
    """Matrices as --quant asks where the format allows (q8_0 needs rows that are a whole number
    of 32-value blocks; others stay f16); vectors (norms, biases, class embedding) in f32, as
    llama.cpp reads them. q4_k_m files are written f16 here and quantized by llama.cpp itself."""
    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim < 2:
        writer.add_tensor(name, data.astype(np.float32))
        return
    if quant == "q8_0" and data.ndim == 2 and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return
    writer.add_tensor(name, data.astype(np.float16))


def finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def map_name(names: gguf.TensorNameMap, name: str, where: str) -> str:
    mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise KitError(f"{where}: tensor '{name}' has no llama.cpp counterpart in gguf {version('gguf')}'s name map; "
                       "this checkpoint's layout is not one llama.cpp runs")
    return mapped


def size_of(path: Path) -> str:
    return f"{Path(path).stat().st_size / 2**20:.1f} MiB"
