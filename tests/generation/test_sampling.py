"""Sampling with the generation cache, and nsa-generate on a trained checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax import cli
from nsa_jax.config import NSAConfig
from nsa_jax.generation.sampling import generate, sample
from nsa_jax.models import DecoderLM
from tests.helpers.models import tiny_model_config

NSA = NSAConfig(compress_block=4, compress_stride=2, select_block=8, num_selected=3,
                num_init_blocks=1, num_local_blocks=1, window=5)


def test_sample_respects_temperature_top_k_and_vocabulary():
    logits = jax.random.normal(jax.random.key(0), (4, 10))
    np.testing.assert_array_equal(sample(logits, None, 0.0, None, 10), jnp.argmax(logits, -1))
    np.testing.assert_array_equal(sample(logits, jax.random.key(1), 1.0, 1, 10),
                                  jnp.argmax(logits, -1))
    draw = jax.jit(jax.vmap(lambda k: sample(logits, k, 5.0, 3, 6)))
    drawn = np.asarray(draw(jax.random.split(jax.random.key(2), 64)))
    top3 = np.asarray(jax.lax.top_k(jnp.where(jnp.arange(10) < 6, logits, -jnp.inf), 3)[1])
    assert all(np.isin(drawn[:, row], top3[row]).all() for row in range(4))
    assert len(np.unique(drawn)) > 1  # it does sample


def test_greedy_generation_equals_argmax_of_the_parallel_forward():
    """Batch of prompts of different lengths: each new token is the argmax of the full forward
    over the prompt and the tokens generated so far."""
    model = DecoderLM(tiny_model_config(2, nsa=NSA, num_layers=1), rngs=nnx.Rngs(4))
    prompts, new = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11]], 12
    out = generate(model, prompts, new, temperature=0.0)
    forward = nnx.jit(lambda m, t: m(t))
    for prompt, generated in zip(prompts, out.tokens):
        seq = np.zeros((1, len(prompt) + new), np.int32)
        seq[0, :len(prompt)] = prompt
        for i in range(new):
            n = len(prompt) + i
            seq[0, n] = int(jnp.argmax(forward(model, jnp.asarray(seq))[0, n - 1]))
        assert seq[0, len(prompt):].tolist() == generated
    assert out.timed_steps == new - 2 and out.tokens_per_second > 0


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0),
                                 dict(top_k=0), dict(prompts=[[1], []])])
def test_bad_generation_arguments_raise(bad):
    model = DecoderLM(tiny_model_config(nsa=NSA, num_layers=1), rngs=nnx.Rngs(0))
    args = {**dict(prompts=[[1, 2]], max_new_tokens=3, temperature=1.0, top_k=None), **bad}
    with pytest.raises(ValueError):
        generate(model, args.pop("prompts"), args.pop("max_new_tokens"), **args)


def test_nsa_generate_samples_from_a_trained_checkpoint(tiny_run, capsys):
    workdir, _ = tiny_run
    cli.generate(["--workdir", str(workdir), "--prompt", "ROMEO:", "--max-new-tokens", "6",
                  "--temperature", "0.7", "--top-k", "20", "--seed", "3"])
    out, err = capsys.readouterr()
    assert out.startswith("ROMEO:")
    assert "tokens/s over 4 decode steps" in err and "step 8" in err


def test_nsa_generate_explains_a_missing_run(tmp_path):
    with pytest.raises(SystemExit, match="config.json"):
        cli.generate(["--workdir", str(tmp_path / "nothing"), "--prompt", "x"])


@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "0"), ("--temperature", "-1"),
                                         ("--temperature", "nan"), ("--top-k", "0")])
def test_nsa_generate_rejects_bad_flags_before_loading(tmp_path, capsys, flag, value):
    """The workdir does not exist: only an error about the flag itself means nothing loaded."""
    with pytest.raises(SystemExit) as stop:
        cli.generate(["--workdir", str(tmp_path / "nothing"), "--prompt", "x", flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be" in err and "config.json" not in err
