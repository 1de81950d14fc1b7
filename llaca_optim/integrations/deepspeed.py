"""DeepSpeed ZeRO for users: the whole EMA weights of a model trained under ZeRO, from the ranks
(:func:`ema_state_dict`) or from a checkpoint's files alone (:func:`ema_weights_from_zero_checkpoint`).
How LLaCA steps DeepSpeed's flat partitions is the optimizer's business (NOTE [ZeRO partitions] in
llaca_optim/optim/zero.py); these adapters use its public API only."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def ema_state_dict(model: torch.nn.Module, optimizer: Any) -> dict[str, Tensor]:
    """The EMA of every parameter of ``model`` that ``optimizer`` (an ``LLaCAAdamW`` or
    ``LLaCA``, DeepSpeed's client optimizer) keeps one of, whole, by parameter name, on every
    rank: the weights to evaluate or deploy, as ``zero_to_fp32`` gives the live ones. Under ZeRO
    it gathers the pieces (one all-reduce per partition): every rank must call it. Empty before
    the first step."""
    return optimizer.ema_state_dict(model)


def ema_weights_from_zero_checkpoint(checkpoint_dir: str, tag: str | None = None) -> dict[str, Tensor]:
    """The weights ``end_task()`` would leave in the model at a DeepSpeed ZeRO checkpoint (each
    parameter's EMA, or its live weights where it has none), whole, in fp32, by parameter name,
    read from the checkpoint files alone: no engine, no ranks, any stage. ``checkpoint_dir`` and
    ``tag`` are those of ``engine.save_checkpoint`` (``tag=None``: the ``latest`` file's).

    DeepSpeed's ``zero_to_fp32`` consolidates the fp32 masters from each rank's optim-states
    file; the EMAs lie beside them in the same files, in the optimizer's state, shaped like the
    masters (NOTE [ZeRO partitions]). So each file is copied with the EMAs in the masters' place
    into a temporary folder (the model-states files linked), and ``zero_to_fp32`` consolidates
    that: the same merging, padding and shapes as DeepSpeed's own."""
    import glob
    import os
    import shutil
    import tempfile

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # Absolute: the scratch folder links to these files, and a relative link would point nowhere.
    checkpoint_dir = os.path.abspath(os.fspath(checkpoint_dir))
    if tag is None:
        latest = os.path.join(checkpoint_dir, "latest")
        if not os.path.isfile(latest):
            raise FileNotFoundError(
                f"llaca_optim: no 'latest' file in {checkpoint_dir!r} to name the checkpoint's "
                "tag; pass the folder given to engine.save_checkpoint (with the Trainer: "
                "output_dir/checkpoint-N) and its tag")
        with open(latest) as f:
            tag = f.read().strip()
    source = os.path.join(checkpoint_dir, tag)
    optim_files = sorted(glob.glob(os.path.join(source, "*_optim_states.pt")))
    if not optim_files:
        raise FileNotFoundError(f"llaca_optim: no *_optim_states.pt files in {source!r}; pass the "
                                "folder and tag given to engine.save_checkpoint")
    def load(path: str) -> dict[str, Any]:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file is named as the user's
            raise ValueError(
                f"llaca_optim: cannot read {path!r} ({type(err).__name__}: {err}); the file is "
                "damaged or was cut short (a save that did not finish?): save the checkpoint "
                "again, or use another one") from err

    # One rank's file in memory at a time (each holds that rank's masters and optimizer state).
    first = load(optim_files[0])
    ranks = first.get("optimizer_state_dict", {}).get("partition_count")
    ranks = max(ranks) if isinstance(ranks, (list, tuple)) else ranks
    if isinstance(ranks, int) and ranks != len(optim_files):
        raise FileNotFoundError(
            f"llaca_optim: the checkpoint in {source!r} was saved by {ranks} ranks but holds "
            f"{len(optim_files)} *_optim_states.pt files ({', '.join(map(os.path.basename, optim_files))}): "
            "a rank's file is missing (a save that did not finish, or files copied in part); "
            "use a complete checkpoint folder")
    scratch = tempfile.mkdtemp()
    try:
        target = os.path.join(scratch, tag)
        os.makedirs(target)
        for name in os.listdir(source):
            if not name.endswith("_optim_states.pt"):
                os.symlink(os.path.join(source, name), os.path.join(target, name))
        for i, path in enumerate(optim_files):
            saved = first if i == 0 else load(path)
            first = None
            _emas_in_place_of_masters(saved["optimizer_state_dict"], path)
            torch.save(saved, os.path.join(target, os.path.basename(path)))
            del saved
        try:
            return get_fp32_state_dict_from_zero_checkpoint(scratch, tag=tag)
        except Exception as err:  # noqa: BLE001 - name the user's folder, not the scratch copy
            message = f"llaca_optim: consolidating {source!r}: {str(err).replace(scratch, checkpoint_dir)}"
            try:
                renamed = type(err)(message)
            except Exception:  # noqa: BLE001 - an exception type with other arguments
                renamed = RuntimeError(message)
            raise renamed from err
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _emas_in_place_of_masters(zero_state: dict[str, Any], path: str) -> None:
    """Puts, in one rank's saved ZeRO optimizer state, each flat partition's EMA where its fp32
    masters are (a partition without an EMA keeps its masters), and drops the rest of the
    optimizer's state, which consolidation does not read."""
    if zero_state.get("zero_stage", 0) == 3:
        masters_key, client = "fp32_flat_groups", zero_state.pop("optimizer_state_dict", None)
    else:
        masters_key, client = "single_partition_of_fp32_groups", zero_state.pop("base_optimizer_state", None)
    if not isinstance(client, dict) or "state" not in client.get("llaca", client):
        raise ValueError(f"llaca_optim: {path!r} holds no state dict of LLaCAAdamW or LLaCA "
                         "(an elastic checkpoint, or another optimizer's)")
    state = client.get("llaca", client)["state"]  # the LLaCA wrapper saves it under "llaca"
    masters = zero_state[masters_key]
    for i, flat in enumerate(masters):
        ema = state.get(i, {}).get("ema")
        if ema is not None:  # stages 1 and 2 save the masters without the last rank's padding
            masters[i] = ema.reshape(-1)[: flat.numel()].to(flat.dtype).view_as(flat).clone()


