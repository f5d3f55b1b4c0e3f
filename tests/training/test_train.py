"""End-to-end training on CPU with tiny models: the loop, the methods and the run directory."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftl.recipe.load import load_recipe, validate_recipe
from ftl.checkpoints.rundir import read_metrics
from ftl.tiny import write_tiny_model
from ftl.train import TrainError, train
from conftest import make_recipe


def _train(model: Path, data: tuple[Path, Path], run_dir: Path, with_eval: bool = False, **sections) -> dict:
    raw = make_recipe(model, data[0], run_dir, eval_path=data[1] if with_eval else None, **sections)
    return train(validate_recipe(raw))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_thirty_steps_lower_eval_loss(tiny_llama: Path, demo_data, tmp_path: Path, method: str) -> None:
    lr = 5e-3 if method == "lora" else 1e-3
    summary = _train(
        tiny_llama, demo_data, tmp_path / method, with_eval=True,
        method={"type": method}, train={"max_steps": 30, "micro_batch_size": 8, "learning_rate": lr, "eval_steps": 10},
    )
    # A random base limits what LoRA alone reaches in 30 steps (its output layer stays random).
    assert summary.final_eval_loss < summary.initial_eval_loss - (0.5 if method == "lora" else 1.0)
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / method / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) == 4 and evals[-1] == pytest.approx(summary.final_eval_loss)


def test_gradient_accumulation_equals_one_big_batch(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    """4 micro-batches of 2 give the same losses and weights as 1 micro-batch of 8."""
    common = {"max_steps": 3, "learning_rate": 1e-3, "max_grad_norm": 1.0, "weight_decay": 0.1}
    runs = {}
    for name, micro, accum in (("accum", 2, 4), ("big", 8, 1)):
        _train(
            tiny_llama, demo_data, tmp_path / name, method={"type": "full"},
            train={**common, "micro_batch_size": micro, "gradient_accumulation_steps": accum},
        )
        runs[name] = tmp_path / name
    losses = {n: [r["loss"] for r in read_metrics(p / "metrics.jsonl")] for n, p in runs.items()}
    tokens = {n: [r["trainable_tokens"] for r in read_metrics(p / "metrics.jsonl")] for n, p in runs.items()}
    assert tokens["accum"] == tokens["big"]
    assert losses["accum"] == pytest.approx(losses["big"], abs=1e-5)
    a = load_file(runs["accum"] / "checkpoints/step-3/model.safetensors")
    b = load_file(runs["big"] / "checkpoints/step-3/model.safetensors")
    base = load_file(tiny_llama / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_lora_checkpoint_is_a_peft_adapter(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    summary = _train(tiny_llama, demo_data, tmp_path / "run", train={"max_steps": 2, "save_steps": 1})
    ckpts = tmp_path / "run/checkpoints"
    assert (ckpts / "latest").read_text() == "step-2"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-1", "step-2"]
    step = Path(summary.checkpoint)
    assert (step / "adapter_config.json").exists() and (step / "adapter_model.safetensors").exists()
    assert (step / "tokenizer.json").exists() and (step / "trainer_state.json").exists()
    assert not (step / "model.safetensors").exists()
    weights = load_file(step / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    assert (tmp_path / "run/run.yaml").exists()
    record = read_metrics(tmp_path / "run/metrics.jsonl")[-1]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "trainable_tokens"} <= record.keys()


def test_full_finetune_with_frozen_layers(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    frozen = ["model.embed_tokens.*", "model.layers.0.*"]
    summary = _train(tiny_llama, demo_data, tmp_path / "run", method={"type": "full", "freeze": frozen})
    after = load_file(Path(summary.checkpoint) / "model.safetensors")
    before = load_file(tiny_llama / "model.safetensors")
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(after["model.layers.1.self_attn.q_proj.weight"], before["model.layers.1.self_attn.q_proj.weight"])


def test_freeze_pattern_matching_nothing_is_an_error(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"method.freeze: pattern 'layers.0.\*' matches no parameter"):
        _train(tiny_llama, demo_data, tmp_path / "run", method={"type": "full", "freeze": ["layers.0.*"]})


def test_resume_never_refuses_run_dir_with_earlier_checkpoints(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    _train(tiny_llama, demo_data, tmp_path / "run", train={"max_steps": 1})
    before = (tmp_path / "run/metrics.jsonl").read_text()
    with pytest.raises(TrainError, match="already holds checkpoints.*train.resume=auto.*output.overwrite=true"):
        _train(tiny_llama, demo_data, tmp_path / "run", train={"max_steps": 1, "resume": "never"})
    assert (tmp_path / "run/metrics.jsonl").read_text() == before  # nothing lost
    _train(tiny_llama, demo_data, tmp_path / "run", train={"max_steps": 2, "resume": "never"}, output={"overwrite": True})
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step-2"
    assert not (tmp_path / "run/checkpoints/step-1").exists()


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_train(arch: str, demo_data, tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / arch, arch, hidden_size=64)
    summary = _train(model, demo_data, tmp_path / "run", train={"max_steps": 2, "gradient_checkpointing": True})
    assert summary.steps == 2 and summary.final_train_loss > 0


def test_bf16_mixed_precision_and_gradient_checkpointing(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    summary = _train(
        tiny_llama, demo_data, tmp_path / "run",
        train={"max_steps": 2, "mixed_precision": "bf16", "gradient_checkpointing": True},
    )
    assert torch.isfinite(torch.tensor(summary.final_train_loss))
    # Another precision in the same process (notebooks, the demo): Accelerate's process-wide state
    # is not asked for it, the strategy's autocast is.
    plain = _train(tiny_llama, demo_data, tmp_path / "run2", train={"max_steps": 2})
    assert plain.steps == 2 and plain.final_train_loss != summary.final_train_loss


@pytest.mark.parametrize("native", [True, False])
def test_mixed_precision_auto_trains_as_what_the_cpu_computes_natively(tiny_llama: Path, demo_data, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """auto is bf16 on a CPU with AVX-512 BF16 (or AMX) and fp32 elsewhere: the auto run's losses
    are those of the run that names that precision, and its run directory records what was used."""
    capabilities = {**torch.cpu.get_capabilities(), "avx512_bf16": native, "amx_bf16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    auto = _train(tiny_llama, demo_data, tmp_path / "auto", train={"max_steps": 2, "mixed_precision": "auto"})
    named = _train(tiny_llama, demo_data, tmp_path / "named", train={"max_steps": 2, "mixed_precision": "bf16" if native else "no"})
    other = _train(tiny_llama, demo_data, tmp_path / "other", train={"max_steps": 2, "mixed_precision": "no" if native else "bf16"})
    assert auto.final_train_loss == named.final_train_loss != other.final_train_loss
    written = load_recipe(tmp_path / "auto" / "run.yaml")
    assert written.train.mixed_precision == ("bf16" if native else "no")


@pytest.mark.slow
def test_compiled_layers_trace_the_eager_run(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    """train.compile: 20 steps through inductor-compiled decoder layers (packed rows, activation
    checkpointing) follow the eager loss trace; inductor fuses and reorders fp32 sums, so the
    traces agree to a relative 1e-4, not bitwise. The checkpoint keeps the eager names."""
    from torch._dynamo.utils import counters

    traces = {}
    for compiled in (False, True):
        counters.clear()
        run = tmp_path / ("compiled" if compiled else "eager")
        raw = make_recipe(tiny_llama, demo_data[0], run, data={"max_length": 128, "packing": True},
                          train={"max_steps": 20, "compile": compiled, "gradient_checkpointing": True, "logging_steps": 1})
        train(validate_recipe(raw))
        traces[compiled] = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # the compiled run really compiled
    assert len(traces[True]) == 20
    torch.testing.assert_close(torch.tensor(traces[True]), torch.tensor(traces[False]), rtol=1e-4, atol=0)
    eager, compiled = (load_file(str(next((tmp_path / name).rglob("adapter_model.safetensors")))) for name in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()


def test_timed_checkpoints_without_save_steps(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    """save_steps unset: a checkpoint whenever save_minutes of training passed (here: a few microseconds,
    so every step), so a crash never loses the whole run; null saves only at the end."""
    from ftl.checkpoints.rundir import RunDir

    train(validate_recipe(make_recipe(tiny_llama, demo_data[0], tmp_path / "timed", train={"max_steps": 3, "save_minutes": 1e-7})))
    assert sorted(p.name for p in RunDir(tmp_path / "timed").step_dirs()) == ["step-1", "step-2", "step-3"]
    train(validate_recipe(make_recipe(tiny_llama, demo_data[0], tmp_path / "end", train={"max_steps": 3, "save_minutes": None})))
    assert [p.name for p in RunDir(tmp_path / "end").step_dirs()] == ["step-3"]
    assert validate_recipe(make_recipe(tiny_llama, demo_data[0], tmp_path / "x")).train.save_minutes == 30
