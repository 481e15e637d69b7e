"""The largest Matryoshka CLT over every layer that fits each device, from the shapes alone (nothing is loaded):
the table of docs/clt.md. `python benchmarks/clt_memory_plans.py`.

For each model and device: the widest d_sae per layer (a multiple of 1,024) whose training (`mtc.clt_train.
clt_memory_plan`: parameters with gradients and Adam state, one activation buffer per hook, the language model and
one step's working set) fits 90% of the device, in batches of 1,024 tokens, with 16-bit activations in a buffer of 32,768 tokens, and in one of 8,192 (a shorter
buffer shuffles less but leaves the room to the decoders).
"""

from __future__ import annotations

from mtc.clt_train import SOURCE_TEMPLATE, TARGET_TEMPLATE, clt_memory_plan, clt_parameters
from mtc.config import TranscoderConfig
from mtc.memory import GiB, NAMED_DEVICES, ModelShape, model_shape

GEMMA_3_1B = dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=256, vocab_size=262_144)  # google/gemma-3-1b-pt's config.json
MODELS = {"gemma-3-270m": lambda: model_shape("gemma-3-270m-offline"),
          "gemma-3-1b": lambda: ModelShape.from_hf_config(GEMMA_3_1B),
          "gemma-2-2b": lambda: model_shape("google/gemma-2-2b")}
DEVICES = ("t4", "a100-40gb", "a100-80gb")


def widest(shape: ModelShape, device: str, buffer_tokens: int) -> tuple[int, float, float] | None:
    """(d_sae, parameters in billions, planned GiB) of the widest CLT that fits, or None."""
    best = None
    for d_sae in range(1024, 65_537, 1024):
        cfg = TranscoderConfig(d_in=shape.d_model, d_out=shape.d_model, d_sae=d_sae, k=64,
                               prefix_sizes=[d_sae // 16, d_sae // 4, d_sae], clt_layers=list(range(shape.n_layers)),
                               source_hook=SOURCE_TEMPLATE, target_hook=TARGET_TEMPLATE, samples_every=0,
                               batch_size=1024, buffer_tokens=buffer_tokens, activation_dtype="bfloat16",
                               model_dtype="bfloat16", model_batch_size=32)
        try:
            plan = clt_memory_plan(cfg, shape, device, int(NAMED_DEVICES[device] * GiB))
        except ValueError:
            break
        need = sum(plan.per_pass.values()) + shape.n_layers * sum(plan.per_layer.values())
        best = (d_sae, clt_parameters(cfg) / 1e9, need / GiB)
    return best


def main() -> None:
    print("| model | layers | d_model | device | buffer 32,768: widest d_sae, CLT parameters, plan | "
          "buffer 8,192: widest d_sae, CLT parameters, plan |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, shape_of in MODELS.items():
        shape = shape_of()
        for device in DEVICES:
            cells = []
            for buffer_tokens in (32_768, 8_192):
                found = widest(shape, device, buffer_tokens)
                cells.append(f"{found[0]:,}, {found[1]:.2f} B, {found[2]:.1f} GiB" if found else "does not fit")
            print(f"| {name} | {shape.n_layers} | {shape.d_model} | {device} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
