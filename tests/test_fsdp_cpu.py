"""FSDP2 code paths on the CPU: accelerate's own FSDP2 preparation (`fsdp2_prepare_model`, the function a GPU run
uses) applied to BLIP in two gloo processes, in each training mode (full, frozen_vision, LoRA). accelerate refuses
FSDP for a CPU run, so a stub stands in for the Accelerator; torch's fully_shard itself runs on gloo. What only a GPU
run covers (the launcher's FSDP plugin, mixed precision, checkpoint saving through accelerate) is not exercised."""

import copy
import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _tiny_blip():
    from transformers import BlipForConditionalGeneration

    from blip_recipes.adapt import adapt_blip
    from blip_recipes.builtin import build_tiny_tokenizer, tiny_blip_config

    torch.manual_seed(0)
    model = BlipForConditionalGeneration(tiny_blip_config(build_tiny_tokenizer()))
    return adapt_blip(model, "sdpa", [0.5] * 3, [0.25] * 3)


def _shard(model, rank):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        transformer_cls_names_to_wrap=["BlipEncoderLayer", "BlipTextLayer"],
        cpu_ram_efficient_loading=False,
    )  # fmt: skip  (as accelerate_configs/fsdp.yaml)
    state = types.SimpleNamespace(fsdp_plugin=plugin)
    accelerator = types.SimpleNamespace(state=state, device=torch.device("cpu"), mixed_precision="no",
                                        is_main_process=rank == 0, torch_device_mesh=None)  # fmt: skip
    return fsdp2_prepare_model(accelerator, model)


def _work(rank, world_size, port, mode, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from blip_recipes.evaluation import generate_caption_ids
        from blip_recipes.model import apply_training_mode

        torch.manual_seed(2)  # LoRA's initial adapter weights
        # No LoRA dropout: the two models would draw different masks.
        plain = apply_training_mode(_tiny_blip(), mode, lora_dropout=0.0, lora_target_modules=["query", "value"])
        sharded = _shard(copy.deepcopy(plain), rank)
        torch.manual_seed(1)
        pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
        ids = torch.randint(5, 60, (2, 7))
        ids[:, 0] = plain.config.text_config.bos_token_id
        losses = []
        for model in (plain, sharded):  # the same batch on every rank: FSDP's averaged gradient is plain's gradient
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
            loss = model(pixel_values=pixels, input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        # The full state dict (what a FULL_STATE_DICT save writes), gathered onto process 0 (the others get none).
        full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        reference = plain.state_dict()
        weights_match = rank != 0 or (
            full.keys() == reference.keys()
            and all(torch.allclose(full[name], reference[name], atol=1e-6) for name in reference)
        )
        prefix = torch.full((2, 1), plain.config.text_config.bos_token_id)
        plain.eval()
        sharded.eval()
        captions = [generate_caption_ids(model, pixels, prefix, num_beams=2, max_length=8, min_length=2).tolist()
                    for model in (plain, sharded)]  # fmt: skip
        results[rank] = {"losses": losses, "weights_match": weights_match, "captions": captions}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode, port", [("full", 29711), ("frozen_vision", 29713), ("lora", 29715)])
def test_fsdp2_trains_generates_and_gathers_the_same_model_as_one_process(mode, port):
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_work, args=(2, port, mode, results), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        outcome = results[rank]
        assert abs(outcome["losses"][0] - outcome["losses"][1]) < 1e-5, outcome["losses"]
        assert outcome["weights_match"]  # one SGD step, then the gathered full state dict: the same weights
        assert outcome["captions"][0] == outcome["captions"][1]  # caption generation under sharding
