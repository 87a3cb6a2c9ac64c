"""The loggers' failures a user meets first, each as one line naming the fix."""

from tests.helpers.train import run_cli


def test_wandb_online_without_a_login_is_one_line_that_names_offline_mode(tmp_path):
    home = tmp_path / "home"  # no ~/.netrc, no W&B settings: a machine where `wandb login` never ran
    home.mkdir()
    env = {"HOME": str(home), "WANDB_API_KEY": "", "WANDB_MODE": "online", "WANDB_CONFIG_DIR": str(home / "wandb")}
    out = run_cli(["logger=wandb", "trainer.steps=2", f"output_root={tmp_path / 'out'}"], cwd=tmp_path, env=env,
                  timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("llmopt: error:")]
    assert len(lines) == 1 and "wandb login" in lines[0] and "logger.wandb.mode=offline" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("metrics.jsonl"))
