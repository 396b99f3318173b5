"""Run a model only as deep as the hookpoints need and return their activations.

Activations are read with forward hooks on the blocks themselves, not with
``output_hidden_states``: in transformers 5 the last hidden state has the final norm applied,
and asking for every hidden state would run (and keep) every block. The deepest needed hook
raises ``StopForward``, so nothing past it runs. The harvester caches what this returns;
analysis reads prompts through it (absorption), so both see the same tensors.
"""

from __future__ import annotations

import torch

from sasa.errors import SasaError
from sasa.hookpoints import parse_hookpoint
from sasa.models import find_blocks, find_sublayer


class StopForward(Exception):
    """Raised by the deepest hook: everything the caller needs has been captured."""


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class ActivationCapture:
    """Runs the model up to the deepest hookpoint and returns {hookpoint: [B, T, d]} tensors.

    The returned tensors are the model's own outputs (no copy); use them before the next call.
    """

    def __init__(self, model: torch.nn.Module, hookpoints) -> None:
        self.model = model
        self.hookpoints = [parse_hookpoint(h) if isinstance(h, str) else h for h in hookpoints]
        _, self.blocks = find_blocks(model)
        self._acts: dict[str, torch.Tensor] = {}
        self._handles = []
        stop_layer, after = max(hp.stop_point for hp in self.hookpoints)
        for hp in self.hookpoints:
            if hp.layer >= len(self.blocks):
                raise SasaError(f"hookpoint {hp.name}: the model has only {len(self.blocks)} "
                                "blocks loaded")
            block = self.blocks[hp.layer]
            if hp.kind == "resid_pre":
                self._handles.append(block.register_forward_pre_hook(
                    self._pre_hook(hp.name), with_kwargs=True))
            elif hp.kind == "resid_post":
                self._handles.append(block.register_forward_hook(self._post_hook(hp.name)))
            else:
                module = find_sublayer(block, hp.kind)
                self._handles.append(module.register_forward_hook(self._post_hook(hp.name)))
        # The stop hook runs after every capture hook of the same module (registration order).
        # A resid_pre-only deepest point stops on entering that block: it never runs.
        if after:
            self._handles.append(self.blocks[stop_layer].register_forward_hook(self._stop))
        else:
            self._handles.append(self.blocks[stop_layer].register_forward_pre_hook(self._stop))
        cfg = getattr(model, "config", None)
        self._kwargs = {"use_cache": False} if getattr(cfg, "use_cache", None) is not None else {}

    def _pre_hook(self, name):
        def hook(module, args, kwargs):
            self._acts[name] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _post_hook(self, name):
        def hook(module, args, output):
            self._acts[name] = _first_tensor(output)
        return hook

    @staticmethod
    def _stop(*_):
        raise StopForward

    @torch.inference_mode()
    def __call__(self, input_ids_BT: torch.Tensor) -> dict[str, torch.Tensor]:
        self._acts = {}
        try:
            self.model(input_ids=input_ids_BT, **self._kwargs)
        except StopForward:
            pass
        missing = [hp.name for hp in self.hookpoints if hp.name not in self._acts]
        if missing:
            raise RuntimeError(f"hooks did not fire for {missing}")
        return self._acts

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
