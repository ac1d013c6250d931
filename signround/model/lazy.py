"""Models larger than memory: build the model on the meta device and hold one block's weights at a time.

``load_skeleton(folder)`` reads ``config.json``, builds the model with every parameter on the meta device
(buffers such as rotary frequencies are computed for real) and loads only the tensors outside the decoder
blocks (embeddings, final norm, output head) from the safetensors files. ``BlockStream.materialize(i)``
then reads block ``i``'s tensors from the shards (:func:`signround.model.files.read_safetensors`: plain
reads into owned memory, nothing else is read or left mapped), and ``release(i)`` puts the block back on
the meta device once its packed layers are persisted. Peak memory is the skeleton plus one block plus the
calibration activations, whatever the depth.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from signround.errors import SignRoundError
from signround.model.blocks import check_finite, find_blocks
from signround.model.experts import UnfusedExperts, split_fused_state, unfuse_experts
from signround.model.files import map_safetensors, read_safetensors
from signround.model.tokenizer import load_tokenizer

log = logging.getLogger("signround")


class SafetensorsIndex:
    """Which file of an HF model folder holds each tensor (``model.safetensors`` or the shards listed in
    ``model.safetensors.index.json``); reads tensors one by one."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {name: folder / f for name, f in weight_map.items()}
            elif (folder / "model.safetensors").is_file():
                with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                    self.files = {name: folder / "model.safetensors" for name in f.keys()}
            else:
                raise SignRoundError(
                    f"--low-memory reads safetensors weights; {folder} has no model.safetensors(.index.json)"
                )
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            raise SignRoundError(f"cannot read the weights of {folder} ({exc}); the model files are corrupt") from None

    def names(self) -> list[str]:
        return list(self.files)

    def load(self, names: list[str], dtype: torch.dtype, mapped: bool = False) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` for ``names`` (floating-point tensors cast to ``dtype``): read into owned memory,
        or with ``mapped`` left on the files where they can be (:func:`~signround.model.files.map_safetensors`,
        which also refuses NaN / Inf)."""
        read = map_safetensors if mapped else read_safetensors
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, wanted in by_file.items():
            try:
                out.update(read(path, wanted, dtype))
            except (SafetensorError, OSError) as exc:
                raise SignRoundError(f"cannot read {path.name}: {exc}; the model files are corrupt") from None
        return out


def load_skeleton(
    folder: str | Path, dtype: torch.dtype = torch.float32, keep: bool = False
) -> tuple[nn.Module, Any, BlockStream]:
    """``(model, tokenizer, stream)``: the model with its blocks' parameters on the meta device and every
    other tensor loaded (copy-on-write views of the files where their dtype allows: only the pages a run
    touches are resident, e.g. the embedding rows of the calibration tokens); ``stream`` loads and releases
    blocks (see :class:`BlockStream`). With ``keep`` the finished blocks stay in memory (the default quantize
    path: a block's float weights are read only when its turn comes, into owned memory, so that a freed block
    leaves the RSS). Every tensor is checked finite as it is read (the outside ones here, a block's when it is
    read), so the pipeline does not check a streamed model again.

    Raises:
        SignRoundError: not an HF safetensors folder, or its weights do not fit its config.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(folder)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise SignRoundError(f"--low-memory needs an HF model folder with config.json and safetensors; got {folder}")
    index = SafetensorsIndex(path)
    try:
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, OSError, KeyError) as exc:
        raise SignRoundError(f"cannot build the model of {folder}: {str(exc).splitlines()[0]}") from None
    unfuse_experts(model)  # one linear per expert (signround.model.experts); fused files are split per block
    prefix, blocks = find_blocks(model)
    _check_block_names(index, prefix, blocks)
    outside = [n for n in index.names() if not n.startswith(prefix + ".")]
    # the tensors outside the blocks live the whole run and are read in part (the embedding's looked-up rows;
    # the output head is not used while tuning): left on the file, checked finite there
    result = model.load_state_dict(index.load(outside, dtype, mapped=True), strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(prefix + ".")]
    if missing or result.unexpected_keys:
        what = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise SignRoundError(f"weights in {folder} do not fit its config: {what}")
    model.eval()
    return model, load_tokenizer(str(path)), BlockStream(index, prefix, blocks, dtype, keep)


def _check_block_names(index: SafetensorsIndex, prefix: str, blocks: nn.ModuleList) -> None:
    """Refuse, before any block is read, a checkpoint whose block tensors are named otherwise than the module
    tree (transformers renames some on load, e.g. per-expert tensors into fused mixture-of-experts ones), so
    that the caller can load it whole through transformers instead of failing at block ``i``.

    Raises:
        SignRoundError: a block parameter the files do not hold under its module name.
    """
    names = set(index.names())
    for i, block in enumerate(blocks):
        # an unfused experts module's weights may come from its fused tensors (split when the block is read)
        fused = {
            n
            for n, m in block.named_modules()
            if isinstance(m, UnfusedExperts) and f"{prefix}.{i}.{n}.down_proj" in names
        }
        missing = [
            f"{prefix}.{i}.{n}"
            for n, _ in block.named_parameters()
            if f"{prefix}.{i}.{n}" not in names and n.rsplit(".", 3)[0] not in fused
        ]
        if missing:
            raise SignRoundError(
                f"the weights in {index.folder} are not named as the model's modules (e.g. {missing[0]}); "
                "transformers converts them on load: load the model whole (drop --low-memory)"
            )


class BlockStream:
    """Loads decoder blocks from the safetensors files on demand and frees them after use.

    Attributes:
        prefix: the blocks' qualified name (``model.layers``).
        packed: where each finished block's packed tensors were persisted (block index -> safetensors file,
            keys relative to the block), for writers that assemble the checkpoint block by block.
        keep: finished blocks stay in memory (loaded on demand only); the pipeline never releases them.
    """

    def __init__(
        self, index: SafetensorsIndex, prefix: str, blocks: nn.ModuleList, dtype: torch.dtype, keep: bool = False
    ) -> None:
        self.index = index
        self.prefix = prefix
        self.blocks = blocks
        self.dtype = dtype
        self.keep = keep
        self.packed: dict[int, Path] = {}

    def materialize(self, i: int) -> nn.Module:
        """Read block ``i``'s float weights into it (in place) and return it."""
        block = self.blocks[i]
        head = f"{self.prefix}.{i}."
        names = [n for n in self.index.names() if n.startswith(head)]
        state = {n[len(head) :]: t for n, t in self.index.load(names, self.dtype).items()}
        state = split_fused_state(block, state)  # fused expert tensors -> the per-expert linears
        result = block.load_state_dict(state, strict=False, assign=True)
        missing = [n for n, p in block.named_parameters() if p.device.type == "meta"]
        if missing or result.unexpected_keys:
            what = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
            raise SignRoundError(f"weights of {head[:-1]} in {self.index.folder} do not fit its config: {what}")
        check_finite(block, head)
        return block

    def release(self, i: int, packed_file: Path) -> None:
        """Free block ``i`` (its tensors go to the meta device); its packed tensors live in ``packed_file``."""
        self.blocks[i].to("meta")
        self.packed[i] = packed_file

    def read_packed(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s packed tensors, keyed by their full names (``model.layers.3.mlp.up_proj.qweight``)."""
        return {f"{self.prefix}.{i}.{k}": v for k, v in load_file(str(self.packed[i])).items()}
