"""util.settings: flags, presets and validation, checked in-process (main.cli and resolve_args)."""
import re
import shlex
import socket

import pytest
import torch

import main
import main_cache
from util import distributed as dist
from util.settings import HelpFormatter, SettingsError, _cfg_list, get_args_parser, resolve_args

TINY = ("--model transdiff_tiny --tokenizer pixel --vae_stride 2 --vae_embed_dim 12 --img_size 16 --class_num 3 "
        "--buffer_size 4 --device cpu --num_workers 0 --batch_size 4").split()
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)


def resolved(argv):
    return resolve_args(get_args_parser().parse_args(argv))


def cli_error(argv, capsys):
    """Run main.cli in-process; return (exit code, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main.cli([str(a) for a in argv])
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--mrar", "--patch_size", "1"], "--mrar needs --patch_size 2"),
    (["--img_size", "17"], "not divisible by the tokenizer stride"),
    (["--vae_embed_dim", "16"], "--vae_embed_dim 12"),
    (["--tokenizer", "kl16", "--vae_stride", "16", "--vae_embed_dim", "16", "--vae_path", "/none/kl16.ckpt"],
     "/none/kl16.ckpt"),
    (["--data_path", "/nonexistent/data"], "/nonexistent/data/train"),
    (["--evaluate", "--num_images", "10"], "multiple of --class_num"),
    (["--preset", "transdiff_l_mrar"], "--preset transdiff_l_mrar is for --model transdiff_large --mrar"),
    (["--sampler", "euler", "--scale_0", "0.9"], "only apply to a stochastic sampler"),
    (["--sampler", "maruyama", "--num_sampling_steps", "1"], "needs --num_sampling_steps >= 2"),
    (["--metrics", "fid_is,nope"], "--metrics nope unknown"),
    (["--cfg", "1,2,3,4"], "a per-stage --cfg list needs --mrar"),
    (["--grad_checkpointing", "-1"], "--grad_checkpointing N takes N >= 0 blocks"),
])
def test_bad_settings_give_a_clear_message(tmp_path, capsys, flags, message):
    code, err = cli_error([*TINY, "--output_dir", tmp_path / "out", "--data_path", tmp_path, "--epochs", 1, *flags],
                          capsys)
    assert code == 2 and message in err and err.startswith("main.py: error: ")


def test_preset_is_checked_against_the_image_size():
    with pytest.raises(SettingsError, match="--preset transdiff_l_512 is for --model transdiff_large --img_size 512"):
        resolved(["--model", "transdiff_large", "--preset", "transdiff_l_512", "--img_size", "256"])
    args = resolved(["--model", "transdiff_large", "--preset", "transdiff_l_512", "--img_size", "512"])
    assert (args.cfg, args.scale_0, args.scale_1) == (1.30, 0.87, 0.87)


def test_explicit_flags_win_over_the_preset_and_ode_samplers_take_only_its_cfg():
    args = resolved(["--model", "transdiff_base", "--preset", "transdiff_b", "--cfg", "1.5"])
    assert (args.cfg, args.scale_0, args.scale_1) == (1.5, 0.87, 0.91)
    args = resolved(["--model", "transdiff_base", "--preset", "transdiff_b", "--sampler", "euler"])
    assert (args.cfg, args.scale_0, args.scale_1) == (1.30, 1.0, 1.0)


def test_lr_is_scaled_by_the_launcher_world_size(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    args = resolved([*TINY, "--blr", "1e-4", "--batch_size", "32", "--gradient_accumulation_steps", "2"])
    assert args.lr == pytest.approx(1e-4 * 32 * 4 * 2 / 256)


def test_legacy_flags_are_accepted_and_listed_as_no_ops(capsys):
    args = resolved([*TINY, "--world_size", "8", "--local_rank", "3", "--num_iter", "256", "--temperature", "1.2"])
    assert args.world_size == 8  # accepted, and nothing reads it
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--world_size", "--local_rank", "--num_iter", "--temperature", "--cfg_schedule"):
        assert f"{flag} " in help_text.split("legacy flags")[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_device_cpu_means_gloo_and_cpu_even_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: pytest.fail("a CPU run selected a GPU"))
    assert resolved(TINY[:-6]).device == "cuda"  # no --device: CUDA when available
    args = resolved(TINY)
    assert args.device == "cpu"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    info = dist.init_distributed(args.device, timeout_minutes=1)
    try:
        assert info.distributed and info.backend == "gloo" and info.device == torch.device("cpu")
    finally:
        dist.cleanup()


def test_cuda_without_cuda_is_a_settings_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingsError, match="CUDA is not available; pass --device cpu"):
        resolved([*TINY, "--device", "cuda"])


def test_main_cache_takes_the_same_device_decision(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exited:
        main_cache.cli(["--tokenizer", "pixel", "--vae_stride", "2", "--vae_embed_dim", "12", "--img_size", "16",
                        "--cached_path", str(tmp_path), "--device", "cuda"])
    assert exited.value.code == 2 and "pass --device cpu" in capsys.readouterr().err


SEED_README_COMMANDS = {
    "cache": "main_cache.py --img_size 256 --vae_path ckpt/vae/kl16.ckpt --vae_embed_dim 16 --batch_size 128 "
             "--data_path ${IMAGENET_PATH} --cached_path ${CACHED_PATH}",
    "train_1step": "main.py --img_size 256 --vae_path ckpt/vae/kl16.ckpt --vae_embed_dim 16 --patch_size 1 "
                   "--model transdiff_large --diffloss_w 1024 --diffusion_batch_mul 4 --epochs 800 "
                   "--warmup_epochs 100 "
                   "--blr 1.0e-4 --batch_size 32 --output_dir ${OUTPUT_DIR} --resume ${OUTPUT_DIR} "
                   "--data_path ${IMAGENET_PATH}",
    "train_mrar": "main.py --img_size 256 --vae_path ckpt/vae/kl16.ckpt --vae_embed_dim 16 --patch_size 1 "
                  "--model transdiff_large --diffloss_w 1024 --mrar --bf16 --diffusion_batch_mul 2 --epochs 40 "
                  "--warmup_epochs 10 --lr 5.0e-5 --batch_size 16 --gradient_accumulation_steps 2 "
                  "--output_dir ${OUTPUT_DIR} --resume ${Transdiff-L_1StepAR_DIR} --data_path ${IMAGENET_PATH}",
    "train_512": "main.py --img_size 512 --vae_path ckpt/vae/kl16.ckpt --vae_embed_dim 16 --patch_size 1 "
                 "--model transdiff_large --diffloss_w 1024 --ema_rate 0.999 --bf16 --diffusion_batch_mul 4 "
                 "--epochs 150 --warmup_epochs 10 --lr 1.0e-4 --batch_size 16 --gradient_accumulation_steps 2 "
                 "--only_train_diff --output_dir ${OUTPUT_DIR} --resume ${Transdiff-L_1StepAR_DIR} "
                 "--data_path ${IMAGENET_PATH}",
    "eval_1step": "main.py --img_size 256 --vae_path ckpt/vae/kl16.ckpt --vae_embed_dim 16 --patch_size 1 "
                  "--model transdiff_large --diffloss_w 1024 --output_dir ${OUTPUT_DIR} --resume ckpt/transdiff_l/ "
                  "--evaluate --eval_bsz 256 --num_images 50000 --cfg 1.3 --scale_0 0.89 --scale_1 0.95",
    "eval_mrar": "main.py --img_size 256 --vae_path ckpt/vae/kl16.ckpt --vae_embed_dim 16 --patch_size 1 "
                 "--model transdiff_large --diffloss_w 1024 --output_dir ${OUTPUT_DIR} "
                 "--resume ckpt/transdiff_l_mrar/ "
                 "--evaluate --eval_bsz 256 --num_images 50000 --cfg 1.3 --scale_0 0.91 --scale_1 0.93",
    "eval_512": "main.py --img_size 512 --vae_path ckpt/vae/kl16.ckpt --vae_embed_dim 16 --patch_size 1 "
                "--model transdiff_large --diffloss_w 1024 --output_dir ${OUTPUT_DIR} --resume ckpt/transdiff_l_512/ "
                "--evaluate --eval_bsz 64 --num_images 50000 --cfg 1.3 --scale_0 0.87 --scale_1 0.87",
}


def _argv(name):
    text = SEED_README_COMMANDS[name]
    for variable in ("${IMAGENET_PATH}", "${CACHED_PATH}", "${OUTPUT_DIR}", "${Transdiff-L_1StepAR_DIR}"):
        text = text.replace(variable, "/data/" + variable.strip("${}"))
    return shlex.split(text)[1:]


@pytest.mark.parametrize("name", sorted(SEED_README_COMMANDS))
def test_seed_readme_commands_parse(name):
    if name == "cache":
        args = main_cache.get_args_parser().parse_args(_argv(name))
        assert args.cached_path == "/data/CACHED_PATH"
        return
    args = get_args_parser().parse_args(_argv(name))
    if name == "train_mrar":
        with pytest.raises(SettingsError, match="--mrar needs --patch_size 2"):
            resolve_args(args)
        args = get_args_parser().parse_args([*_argv(name), "--patch_size", "2"])
    resolve_args(args)
    assert args.diffloss_w == 1024 and args.sampler == "maruyama"
    with torch.device("meta"):  # full-size weights are never allocated
        model = main.build_model(args)
    assert model.mrar == args.mrar and model.img_size == args.img_size


def float_flags(parser):
    """Every flag that takes a float, or a list of floats."""
    return sorted(action.dest for action in parser._actions if action.type in (float, _cfg_list))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_setting_must_be_finite(value):
    flags = float_flags(get_args_parser())
    assert {"cfg", "ema_rate", "grad_clip", "lr", "blr", "scale_0", "save_every_minutes", "temperature"} <= set(flags)
    for name in flags:
        with pytest.raises(SettingsError, match=f"^--{name} {value}: must be a finite number$"):
            resolved([*TINY, f"--{name}={value}"])
    with pytest.raises(SettingsError, match=f"^--cfg 1.0,{value},1.0,1.0: must be a finite number$"):
        resolved([*TINY, "--mrar", "--patch_size", "2", f"--cfg=1,{value},1,1"])
    for name in float_flags(main_cache.get_args_parser()):
        with pytest.raises(SettingsError, match=f"^--{name} {value}: must be a finite number$"):
            main_cache.resolve_settings(main_cache.get_args_parser().parse_args(
                ["--cached_path", "c", f"--{name}={value}"]))


@pytest.mark.parametrize("flag, value, message", [
    ("--start_epoch", "-3", "--start_epoch -3: must be >= 0"),
    ("--eval_freq", "0", "--eval_freq 0: must be >= 1"),
    ("--class_num", "0", "--class_num 0: must be >= 1"),
    ("--num_images", "0", "--num_images 0: must be >= 1"),
    ("--label_drop_prob", "1.5", r"--label_drop_prob 1.5: must be in \[0.0, 1.0\]"),
    ("--ema_rate", "-0.1", r"--ema_rate -0.1: must be in \[0.0, 1.0\]"),
    ("--attn_dropout", "1.01", r"--attn_dropout 1.01: must be in \[0.0, 1.0\]"),
    ("--seed", "-1", r"--seed -1: must be in \[0, 2147483647\]"),
    ("--grad_clip", "-1", "--grad_clip -1.0: must be >= 0.0"),
    ("--save_every_minutes", "-0.5", "--save_every_minutes -0.5: must be >= 0.0"),
    ("--save_last_freq", "0", "--save_last_freq 0: must be >= 1"),
    ("--preview_freq", "-1", "--preview_freq -1: must be >= 0"),
    ("--preview_steps", "0", "--preview_steps 0: must be >= 1"),
    ("--batch_size", "0", "--batch_size 0: must be >= 1"),
    ("--eval_bsz", "0", "--eval_bsz 0: must be >= 1"),
    ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps 0: must be >= 1"),
    ("--num_workers", "-2", "--num_workers -2: must be >= 0"),
    ("--num_sampling_steps", "0", "--num_sampling_steps 0: must be >= 1"),
    ("--scale_1", "-1", "--scale_1 -1.0: must be >= 0.0"),
    ("--lr", "0", "--lr 0.0: must be > 0"),
    ("--blr", "-1e-4", "--blr -0.0001: must be > 0"),
    ("--dist_timeout", "0", "--dist_timeout 0.0: must be > 0"),
    ("--peak_tflops", "-5", "--peak_tflops -5.0: must be > 0"),
])
def test_numbers_out_of_range_are_refused_in_one_line_and_nothing_is_written(tmp_path, capsys, flag, value,
                                                                             message):
    code, err = cli_error([*TINY, "--output_dir", tmp_path / "out", "--data_path", tmp_path, f"{flag}={value}"],
                          capsys)
    assert code == 2 and re.fullmatch(f"main.py: error: {message}\n", err), err
    assert not (tmp_path / "out").exists()


def test_the_edges_of_each_range_are_accepted():
    args = resolved([*TINY, "--start_epoch", "0", "--ema_rate", "1", "--label_drop_prob", "0", "--grad_clip", "0",
                     "--seed", str(2**31 - 1), "--save_every_minutes", "0", "--num_workers", "0", "--epochs", "0"])
    assert (args.start_epoch, args.ema_rate, args.seed) == (0, 1.0, 2**31 - 1)


def test_a_slurm_task_count_without_srun_stops_at_once(tmp_path, capsys, monkeypatch):
    for name, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    code, err = cli_error([*TINY, "--output_dir", tmp_path / "out", "--data_path", tmp_path], capsys)
    assert code == 2 and err.startswith("main.py: error: SLURM_NTASKS=2 but this process was not started by srun")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("inside", ["data/train", "data/train/ants/evaluations", "cache/run"])
def test_an_output_folder_inside_the_training_data_is_refused(tmp_path, capsys, inside):
    (tmp_path / "data" / "train" / "ants").mkdir(parents=True)
    (tmp_path / "cache").mkdir()
    out = tmp_path / inside
    code, err = cli_error([*TINY, "--data_path", tmp_path / "data", "--cached_path", tmp_path / "cache",
                           "--output_dir", out, "--evaluate", "--num_images", "3"], capsys)
    assert code == 2 and err.startswith(f"main.py: error: --output_dir {out} is inside the training data ")
    assert err.count("\n") == 1


def test_an_output_folder_beside_the_training_data_is_fine(tmp_path):
    args = resolved([*TINY, "--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "data" / "runs")])
    assert args.output_dir == str(tmp_path / "data" / "runs")  # only <data_path>/train is read


@pytest.mark.parametrize("parser", [get_args_parser(), main_cache.get_args_parser()], ids=["main", "main_cache"])
def test_help_gives_every_flag_a_line_and_its_default(parser):
    flags = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert [action.dest for action in flags if not action.help] == []
    formatter = HelpFormatter(parser.prog)
    assert [action.dest for action in flags if "default" not in formatter._get_help_string(action)] == []
    text = parser.format_help()
    assert "default: transdiff_large" in text or parser.prog.startswith("Cache")
    assert "default: 50000" in text or parser.prog.startswith("Cache")
    assert "(default: 10)" in text and "(default: ckpt/vae/kl16.ckpt)" in text
