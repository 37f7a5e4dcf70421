"""python -m controlnext_train --pretrained_model_name_or_path CKPT --train_data_dir DIR --output_dir DIR [...]

Train ControlNeXt's run without the editor: the same loop, data cache, checkpoints, release files and
validation samples as the node (nodes/train.py ``train_controlnext``), with ComfyUI used as a library
to load the checkpoint. An SVD checkpoint trains a ControlNeXt-SVD-v2 from clips as Train ControlNeXt
SVD does (nodes/video_train.py ``train_controlnext_svd``): a folder of clip folders, or the official
meta-info file. The flags carry the official training scripts' names where the meaning is the
same. Under torchrun or ``accelerate launch`` every process trains its share of each global batch
(``--train_batch_size`` pictures each); the first process alone builds the cache and writes files.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import sys
import threading
import time

PROG = "controlnext-train"
# --train_unet for SVD: the video node's trained sets (controlnext_core.video_train.VIDEO_TRAINED_SETS)
TRAIN_UNET_SVD = {"official": "all", "attention": "attention outputs and values", "none": "encoder only"}
# the official SVD-v2 recipe (controlnext_core.video_train.OFFICIAL_VIDEO_RECIPE; not imported here:
# the pack's modules load only after ComfyUI is found)
OFFICIAL_FRAMES, OFFICIAL_INTERVAL, OFFICIAL_WIDTH, OFFICIAL_HEIGHT = 14, 3, 576, 1024
PRECISIONS = {"no": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "auto": "auto"}
log = logging.getLogger("ControlNeXt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a ControlNeXt from a folder of pictures (SD1.5, SDXL: as the node Train ControlNeXt does) "
                    "or of clips (SVD-v2 pose, as the official train_svd.py and the node Train ControlNeXt SVD), on "
                    "one process or under torchrun / accelerate launch. Writes the release "
                    "(controlnet.safetensors, unet.safetensors) into --output_dir, checkpoints into its checkpoints/ "
                    "folder and validation samples into its validation/ folder.")
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", metavar="CHECKPOINT",
                       help="the SD1.5, SDXL or SVD checkpoint file to train for (a path, or a name in ComfyUI's "
                            "models/checkpoints; SVD-v2: SVD-XT 1.1 with its CLIP vision and VAE); required")
    model.add_argument("--controlnet_model_name_or_path", metavar="FILE",
                       help="continue training this ControlNeXt encoder file (a 'base' layout file) instead of a new one")
    model.add_argument("--comfyui", metavar="PATH",
                       help="the ComfyUI folder to load models with; default: COMFYUI_PATH, or the ComfyUI whose "
                            "custom_nodes holds this pack")
    data = parser.add_argument_group("data (read as Load Training Data reads a folder)")
    data.add_argument("--train_data_dir", metavar="DIR",
                      help="the folder of training pairs; SVD: of clips, a subfolder each with frames/ (or "
                           "video.mp4), poses/ (or poses.mp4) and optionally hands.json; required, but for SVD with "
                           "--meta_info_path")
    data.add_argument("--layout", default="auto", choices=("auto", "folders", "metadata", "pictures"),
                      help="folders: controls of the same names in --control_folder, captions in caption files; "
                           "metadata: a metadata.jsonl/.csv/.parquet naming picture, control and caption; pictures: "
                           "pictures only, controls made by --make_controls; auto: whichever the folder holds")
    data.add_argument("--control_folder", default="conditioning_images",
                      help="folders layout: the folder of control pictures inside --train_data_dir")
    data.add_argument("--caption_extension", default=".txt", help="folders/pictures layouts: caption files' extension")
    data.add_argument("--default_caption", default="", help="the caption of pictures without one")
    data.add_argument("--make_controls", default="none", choices=("none", "canny"),
                      help="pictures layout: make each control once, cached")
    data.add_argument("--image_column", default="image", help="metadata layout: the picture column")
    data.add_argument("--conditioning_image_column", default="conditioning_image",
                      help="metadata layout: the control picture column")
    data.add_argument("--caption_column", default="text", help="metadata layout: the caption column")
    data.add_argument("--resolution", type=int, default=512, help="training size (SD1.5: 512, SDXL: 1024)")
    video = parser.add_argument_group("video (SVD checkpoints: the official train_svd.py's flags)")
    video.add_argument("--meta_info_path", metavar="JSON",
                       help="the official meta-info file (a list of video_path, guide_path, meta_info; paths "
                            "relative to it) instead of --train_data_dir")
    video.add_argument("--dwpose_detector", metavar="FILE",
                       help="with --dwpose_model: DWPose draws the poses of clip folders without poses/ and finds the "
                            "hands of those without hands.json, once, kept in the clips folder's .controlnext_poses "
                            "(a path, or a name in ComfyUI's models/dwpose: yolox_l.onnx)")
    video.add_argument("--dwpose_model", metavar="FILE", help="the whole-body pose model (dw-ll_ucoco_384.onnx)")
    video.add_argument("--sample_n_frames", type=int, default=OFFICIAL_FRAMES, help="frames per sample")
    video.add_argument("--interval_frame", type=int, default=OFFICIAL_INTERVAL,
                       help="take every Nth frame (0: drawn from 2 to 7 per sample)")
    video.add_argument("--width", type=int, default=OFFICIAL_WIDTH, help="training width (multiple of 64)")
    video.add_argument("--height", type=int, default=OFFICIAL_HEIGHT, help="training height (multiple of 64)")
    video.add_argument("--conditioning_dropout_prob", type=float, default=0.1,
                       help="share of samples without the reference embedding (2x this) or latents (2x this, "
                            "overlapping)")
    training = parser.add_argument_group("training")
    training.add_argument("--max_train_steps", type=int, default=400, help="optimiser steps")
    training.add_argument("--train_batch_size", type=int, default=1,
                          help="pictures per process per micro-batch; the global batch is this x "
                               "--gradient_accumulation_steps x the number of processes")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1,
                          help="micro-batches computed one after the other per optimiser step")
    training.add_argument("--optimizer", default="official", choices=("official", "adamw", "adafactor"),
                          help="official: the family's whole official recipe (learning rates, warm-up, clipping), "
                               "whatever --learning_rate, --learning_rate_controlnet and --lr_warmup_steps say")
    training.add_argument("--learning_rate", type=float, default=1e-5,
                          help="the trained UNet weights' learning rate (SVD: the encoder's too, AdamW)")
    training.add_argument("--learning_rate_controlnet", type=float, default=1e-4, help="the encoder's learning rate")
    training.add_argument("--lr_warmup_steps", type=int, default=0, help="linear learning-rate warm-up steps")
    training.add_argument("--train_unet", default="official", choices=tuple(TRAIN_UNET_SVD),
                          help="official: the official scripts' UNet weights (SD1.5 attention outputs, SDXL "
                               "cross-attention outputs, SVD every weight); attention: SVD's attention outputs and "
                               "values (train_svd.py's selective choice); none: the encoder only")
    training.add_argument("--controlnext_scale", "--controlnet_scale_factor", dest="controlnext_scale", type=float,
                          default=0.0, help="the control scale trained at and saved in the file (official SD1.5 "
                                            "examples: 0.35); 0: the continued file's, or 1.0")
    training.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                          help="share of pictures trained with an empty prompt")
    training.add_argument("--seed", type=int, default=0, help="seeds the encoder, noise, timesteps and data order")
    training.add_argument("--mixed_precision", choices=sorted(PRECISIONS), default=None,
                          help="compute precision (trained weights stay fp32); default: accelerate launch's setting, "
                               "else auto (the model's own dtype)")
    training.add_argument("--gradient_checkpointing", action="store_true",
                          help="recompute the UNet's activations in the backward pass: less memory, more time")
    saving = parser.add_argument_group("checkpoints and validation")
    saving.add_argument("--output_dir", metavar="DIR", help="where the release, checkpoints/ and validation/ go; "
                                                          "required")
    saving.add_argument("--checkpointing_steps", type=int, default=500,
                        help="steps between checkpoints (also written at the end and on Ctrl-C); 0: none")
    saving.add_argument("--checkpoints_total_limit", type=int, default=3, help="checkpoints kept")
    saving.add_argument("--resume_from_checkpoint", metavar="latest|PATH",
                        help="continue a run exactly: 'latest' (the newest in --output_dir/checkpoints), or a "
                             "checkpoint folder")
    saving.add_argument("--validation_image", nargs="+", metavar="FILE", default=[],
                        help="control pictures to sample every --validation_steps steps")
    saving.add_argument("--validation_prompt", nargs="+", metavar="TEXT", default=[],
                        help="their prompt: one for all, or one per --validation_image")
    saving.add_argument("--validation_negative_prompt", metavar="TEXT", help="a negative prompt (CFG 5); without, CFG 1")
    saving.add_argument("--validation_steps", type=int, default=100, help="steps between validation samples")
    saving.add_argument("--validation_dir", metavar="DIR",
                        help="where the validation samples go; default: the validation folder in --output_dir")
    saving.add_argument("--overwrite", action="store_true",
                        help="replace release files already in --output_dir (never needed to resume)")
    running = parser.add_argument_group("running")
    running.add_argument("--config_file", metavar="FILE",
                         help="a .json or .toml file of these options by their names (train_batch_size = 4); the "
                              "command line overrides it")
    running.add_argument("--cpu", action="store_true", help="train on the CPU (accelerate launch --cpu sets it too)")
    running.add_argument("--ddp_timeout", type=float, default=30.0,
                         help="minutes a process waits for the others at a step (e.g. while the first samples)")
    running.add_argument("--cache_timeout", type=float, default=24 * 60.0,
                         help="minutes the other processes wait for the first to build the data cache")
    running.add_argument("--progress_lines", action="store_true",
                         help="print 'step N/M loss X' on stdout after every step (for a program that follows the run)")
    running.add_argument("--report_json", metavar="PATH",
                         help="each process writes PATH.<rank>.json: its device, every step's end time and its peak "
                              "memory (benchmarks/train_throughput.py reads them)")
    return parser


REQUIRED = ("pretrained_model_name_or_path", "train_data_dir", "output_dir")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, over the config file's values; a clear error for an unknown option in either."""
    parser = build_parser()
    first = parser.parse_args(argv)
    if first.config_file:
        known = {action.dest for action in parser._actions} - {"help", "config_file"}
        config = read_config(first.config_file)
        unknown = sorted(set(config) - known)
        if unknown:
            parser.error(f"{first.config_file} names unknown options: {', '.join(unknown)} (the options are the flags' "
                         f"names without the dashes: {PROG} --help)")
        parser.set_defaults(**config)
        first = parser.parse_args(argv)
    missing = [f"--{name}" for name in REQUIRED if not getattr(first, name)
               and not (name == "train_data_dir" and first.meta_info_path)]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if first.validation_prompt and not first.validation_image:
        parser.error("--validation_prompt needs --validation_image (the controls to sample)")
    if first.validation_image and len(first.validation_prompt) not in (0, 1, len(first.validation_image)):
        parser.error(f"{len(first.validation_prompt)} validation prompts for {len(first.validation_image)} validation "
                     f"images: give none (the empty prompt), one, or one per image")
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "validation_steps",
                 "checkpoints_total_limit"):
        if getattr(first, name) < 1:
            parser.error(f"--{name} must be 1 or more, not {getattr(first, name)}")
    return first


def read_config(path: str) -> dict:
    try:
        with open(path, "rb") as file:
            if path.endswith(".toml"):
                import tomllib

                return tomllib.load(file)
            config = json.load(file)
    except (OSError, ValueError, ImportError) as error:
        raise SystemExit(f"{PROG}: error: cannot read the config file {path}: {error}") from None
    if not isinstance(config, dict):
        raise SystemExit(f"{PROG}: error: the config file {path} must hold an object of option names and values")
    return config


class Launch:
    """This process's place among those a launcher started (torchrun, accelerate launch: their
    environment variables); one process where there is no launcher."""

    def __init__(self, environ=os.environ):
        self.rank = int(environ.get("RANK", 0))
        self.count = int(environ.get("WORLD_SIZE", 1))
        self.local_rank = int(environ.get("LOCAL_RANK", 0))
        self.accelerate_cpu = environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        self.accelerate_precision = environ.get("ACCELERATE_MIXED_PRECISION")

    def pin_gpu(self) -> None:
        """Each process sees one GPU (the LOCAL_RANK-th of those visible), before ComfyUI picks its device."""
        if self.count == 1:
            return
        visible = [gpu for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[self.local_rank] if len(visible) > self.local_rank else str(
            self.local_rank)


class StopRequest:
    """Ctrl-C or SIGTERM (a launcher stopping its processes): the run stops after the step in
    progress with a checkpoint, as Cancel does in the editor; a second signal stops at once. A
    second one within ``REPEAT_S`` is the same request: a terminal's Ctrl-C reaches each process
    and torchrun, which passes it on once more."""

    REPEAT_S = 5.0

    def __init__(self):
        self.event = threading.Event()
        self.first = 0.0

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        if self.event.is_set():
            if time.monotonic() - self.first < self.REPEAT_S:
                return
            signal.signal(number, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.event.set()
        self.first = time.monotonic()
        print(f"{PROG}: {signal.Signals(number).name}: stopping after this step with a checkpoint (again, after "
              f"{self.REPEAT_S:g} s: stop at once, without one)", file=sys.stderr, flush=True)


class StepReport:
    """What a benchmark reads of a run (``--report_json``): each step's end, the peak memory."""

    def __init__(self, path: str | None, rank: int):
        self.path, self.rank, self.step_ends = path, rank, []

    def stepped(self) -> None:
        self.step_ends.append(time.perf_counter())

    def write(self) -> None:
        if not self.path:
            return
        import resource

        import torch

        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        report = {"rank": self.rank, "step_ends": self.step_ends,
                  "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                  "peak_gpu_bytes": torch.cuda.max_memory_allocated(0) if cuda else None,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        with open(f"{self.path}.{self.rank}.json", "w", encoding="utf-8") as file:
            json.dump(report, file)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    launch = Launch()
    # the first process tells the run; the others only their warnings and errors
    logging.basicConfig(level=logging.INFO if launch.rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"[{launch.rank}/{launch.count}] %(message)s" if launch.count > 1 else "%(message)s")
    cpu = args.cpu or launch.accelerate_cpu
    if not cpu:
        launch.pin_gpu()
    try:
        import torch
    except ImportError:
        raise SystemExit(f"{PROG}: error: this Python ({sys.executable}) has no torch: run the command with the "
                         f"Python of the ComfyUI it loads models with (its venv).") from None

    cpu = cpu or not torch.cuda.is_available()  # a machine without a GPU trains on its CPU (gloo between processes)
    from controlnext_testbed import comfy_library

    if not os.path.isfile(os.path.join(comfy_library.PACK_ROOT, "nodes", "train.py")):
        raise SystemExit(f"{PROG}: error: the pack's folder was not found beside this command ({comfy_library.PACK_ROOT}"
                         f"): install it editable (pip install -e <the pack's folder>), or run python -m "
                         f"controlnext_train in the pack's folder.")
    comfy_library.use_comfyui(args.comfyui, cpu=cpu)

    core = comfy_library.pack("controlnext_core")
    group = comfy_library.pack("controlnext_core.processes")
    processes = join_processes(launch, cpu, args.ddp_timeout)
    stop = StopRequest()
    stop.install()
    try:
        code = train(args, launch, stop)
        if processes:
            group.Processes.joined().leave()
        return code
    except group.ProcessesStopped as error:
        print(f"{PROG}: error: {error} {resume_hint(args.output_dir)}", file=sys.stderr)
        return 1
    except core.ControlNeXtError as error:  # the group is not left: the others end at their next collective
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


def join_processes(launch: Launch, cpu: bool, timeout_minutes: float) -> bool:
    """Joins the launcher's process group (gloo on the CPU, NCCL on GPUs); False for one process."""
    import torch

    if launch.count == 1:
        return False
    if not torch.distributed.is_available():
        raise SystemExit(f"{PROG}: error: this torch has no torch.distributed: several processes cannot train "
                         f"together; run one process.")
    gpu = not cpu and torch.cuda.is_available()
    backend = "nccl" if gpu and torch.distributed.is_nccl_available() else "gloo"
    if gpu and backend == "gloo":
        log.warning("NCCL is not available in this torch: the processes exchange gradients through gloo (slower).")
    if gpu:
        torch.cuda.set_device(0)  # the one GPU this process sees (Launch.pin_gpu)
    try:
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    except (RuntimeError, ValueError) as error:
        raise SystemExit(
            f"{PROG}: error: process {launch.rank} of {launch.count} could not join the others ({type(error).__name__}:"
            f" {str(error).splitlines()[0]}). Is MASTER_PORT ({os.environ.get('MASTER_PORT')}) free and the same for "
            f"all? Start the processes with torchrun or accelerate launch.") from None
    return True


def resume_hint(output_dir: str) -> str:
    from controlnext_testbed import comfy_library

    latest = comfy_library.pack("controlnext_core.checkpoints").latest_checkpoint(os.path.join(output_dir, "checkpoints"))
    if latest is None:
        return "No checkpoint was written yet."
    return f"The last checkpoint is {latest}: run the same command with --resume_from_checkpoint latest to continue."


def checkpoint_file(name: str) -> str:
    import folder_paths

    from controlnext_testbed import comfy_library

    if os.path.isfile(name):
        return os.path.abspath(name)
    path = folder_paths.get_full_path("checkpoints", name)
    if path is None:
        raise comfy_library.pack("controlnext_core").ControlNeXtError(
            f"--pretrained_model_name_or_path {name} is neither a file nor a name in ComfyUI's models/checkpoints: give "
            f"the path of an SD1.5 or SDXL checkpoint (.safetensors).")
    return path


def load_checkpoint(path: str):
    """(MODEL, CLIP, VAE, CLIP_VISION) as ComfyUI's Load Checkpoint (SD1.5, SDXL) or Image Only
    Checkpoint Loader (SVD) gives them."""
    import comfy.sd
    import folder_paths

    from controlnext_testbed import comfy_library

    error_class = comfy_library.pack("controlnext_core").ControlNeXtError
    try:
        model, clip, vae, clip_vision = comfy.sd.load_checkpoint_guess_config(
            path, output_vae=True, output_clip=True, output_clipvision=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))
    except Exception as error:  # ComfyUI raises RuntimeError for a file of no known model, others for broken files
        raise error_class(
            f"{path} is not a checkpoint ComfyUI can load ({type(error).__name__}: {str(error).splitlines()[0]}): give "
            f"an SD1.5 or SDXL checkpoint file with its text encoder and VAE, or an SVD one with its CLIP vision and "
            f"VAE.") from None
    video = comfy_library.pack("nodes.patch").model_family(model.model) == "svd"
    missing = ("VAE" if vae is None else "CLIP vision model" if video and clip_vision is None
               else "text encoder" if not video and clip is None else None)
    if missing:
        raise error_class(
            f"{path} holds no {missing}: training encodes the {'clips' if video else 'captions and pictures'} with "
            f"the checkpoint's own; give a full {'SVD (SVD-XT 1.1)' if video else 'SD1.5 or SDXL'} checkpoint.")
    return model, clip, vae, clip_vision


def check_output_dir(args, core) -> str:
    """The release folder; refused where it holds another run's checkpoints (without a resume) or
    release files (without --overwrite)."""
    from controlnext_testbed import comfy_library

    checkpoints = comfy_library.pack("controlnext_core.checkpoints")
    output_dir = os.path.abspath(args.output_dir)
    has_checkpoints = bool(checkpoints.checkpoint_folders(os.path.join(output_dir, "checkpoints")))
    if has_checkpoints and not args.resume_from_checkpoint:
        raise core.ControlNeXtError(f"{output_dir} already has checkpoints of a run: add --resume_from_checkpoint latest "
                                    f"to continue it, or choose another --output_dir.")
    releases = sorted(name for name in os.listdir(output_dir) if name.endswith(".safetensors")) if os.path.isdir(
        output_dir) else []
    if releases and not has_checkpoints and not args.overwrite:
        raise core.ControlNeXtError(f"{output_dir} already holds {', '.join(releases)}: choose another --output_dir, "
                                    f"or add --overwrite.")
    return output_dir


def train(args, launch: Launch, stop: StopRequest) -> int:
    import torch

    from controlnext_testbed import comfy_library

    core = comfy_library.pack("controlnext_core")
    dataset = comfy_library.pack("controlnext_core.dataset")
    train_nodes = comfy_library.pack("nodes.train")
    data_nodes = comfy_library.pack("nodes.train_data")
    output_dir = check_output_dir(args, core)
    checkpoint = checkpoint_file(args.pretrained_model_name_or_path)
    model, clip, vae, clip_vision = load_checkpoint(checkpoint)
    if comfy_library.pack("nodes.patch").model_family(model.model) == "svd":
        return train_video(args, launch, stop, model, clip_vision, vae, checkpoint, output_dir)
    if args.meta_info_path:
        raise core.ControlNeXtError(f"--meta_info_path is the official SVD-v2 clips' file; {checkpoint} is not an SVD "
                                    f"checkpoint: give the pictures with --train_data_dir.")
    data, data_text = data_nodes.training_data(
        os.path.abspath(args.train_data_dir), args.train_data_dir, args.layout, args.resolution, args.control_folder,
        args.caption_extension, args.default_caption, args.make_controls, args.image_column,
        args.conditioning_image_column, args.caption_column)
    log.info("%s.", data_text)
    if args.train_unet == "attention":
        raise core.ControlNeXtError("--train_unet attention is SVD's selective set; for SD1.5 and SDXL choose "
                                    "official (the official scripts' subset) or none.")
    validation = {}
    if args.validation_image:
        encode = data_nodes.encode_text
        validation = {
            "validation_images": torch.stack([dataset.load_picture(path, args.resolution) for path in args.validation_image]),
            "validation_positive": [entry for prompt in args.validation_prompt or [""] for entry in encode(clip, prompt)],
            "validation_negative": (encode(clip, args.validation_negative_prompt)
                                    if args.validation_negative_prompt is not None else None),
            "validation_every": args.validation_steps}
    warn_of_deepspeed("The trained weights are small beside the frozen UNet (SD1.5 28 M, SDXL 106 M): ZeRO-2 would "
                      "save at most about 1 GB per GPU here.")
    report = StepReport(args.report_json, launch.rank)
    output = train_nodes.train_controlnext(
        model, steps=args.max_train_steps, batch_size=args.train_batch_size, encoder_lr=args.learning_rate_controlnet,
        unet_lr=args.learning_rate, train_unet="none" if args.train_unet == "none" else "official subset",
        optimizer=args.optimizer, warmup_steps=args.lr_warmup_steps, control_scale=args.controlnext_scale,
        proportion_empty_prompts=args.proportion_empty_prompts, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing, precision=PRECISIONS[compute_precision(args, launch)],
        controlnext=continued_encoder(args), clip=clip, data=data, vae=vae,
        gradient_accumulation_steps=args.gradient_accumulation_steps, checkpoint_every=args.checkpointing_steps, resume=resume_choice(args), base_model=os.path.basename(checkpoint),
        release=output_dir, checkpoints_kept=args.checkpoints_total_limit,
        validation_folder=os.path.abspath(args.validation_dir or os.path.join(output_dir, "validation")),
        cache_wait_s=args.cache_timeout * 60, hooks_class=command_hooks(args, stop, report), **validation)
    return finish(output, launch, report, output_dir)


def compute_precision(args, launch: Launch) -> str:
    return args.mixed_precision or launch.accelerate_precision or "auto"


def warn_of_deepspeed(cost: str) -> None:
    """accelerate launch with a DeepSpeed config runs this command data-parallel, not sharded."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        log.warning("A DeepSpeed config was given: the processes train data-parallel (gradients summed over them), "
                    "not with ZeRO. %s", cost)


def continued_encoder(args):
    """The ControlNeXt file --controlnet_model_name_or_path continues, as Load ControlNeXt gives it."""
    if not args.controlnet_model_name_or_path:
        return None
    from controlnext_testbed import comfy_library

    path = os.path.abspath(args.controlnet_model_name_or_path)
    encoder, metadata = comfy_library.pack("controlnext_core").load_encoder_file(path)
    return comfy_library.pack("nodes.patch").ControlNeXtFile(os.path.basename(path), encoder, metadata)


def resume_choice(args) -> str:
    """--resume_from_checkpoint as the training's resume: no, latest, or a checkpoint folder."""
    resume = args.resume_from_checkpoint or "no"
    return resume if resume in ("no", "latest") else os.path.abspath(resume)


def command_hooks(args, stop: StopRequest, report: StepReport) -> type:
    """The training hooks of a ComfyUI server, with the command's own Cancel (a signal) and progress."""
    from controlnext_testbed import comfy_library

    class CommandHooks(comfy_library.pack("nodes.train").ComfyHooks):
        def cancel_requested(self, steps_done: int, steps: int) -> bool:
            return stop.event.is_set()

        def stepped(self, trainer, loss: float) -> None:
            report.stepped()
            if args.progress_lines and trainer.processes.writes:
                print(f"step {trainer.steps_done}/{trainer.settings.steps} loss {loss:.6f}", flush=True)

    return CommandHooks


def finish(output, launch: Launch, report: StepReport, output_dir: str) -> int:
    """The run's report, and its release files written by the first process."""
    from controlnext_testbed import comfy_library

    report.write()
    trained = output.args[0]
    if launch.rank == 0:
        paths = comfy_library.pack("controlnext_core.train").save_release(
            output_dir, trained.encoder, trained.unet_file_weights, trained.metadata, overwrite=True)
        print(f"Saved {', '.join(paths)}", flush=True)
    return 0


def train_video(args, launch: Launch, stop: StopRequest, model, clip_vision, vae, checkpoint: str,
                output_dir: str) -> int:
    """An SVD checkpoint: the SVD-v2 pose training of Train ControlNeXt SVD, from a folder of clip
    folders or the official meta-info file."""
    from controlnext_testbed import comfy_library

    core = comfy_library.pack("controlnext_core")
    video_data = comfy_library.pack("controlnext_core.video_dataset")
    not_for_video = [flag for flag, given in (
        ("--validation_image", args.validation_image), ("--optimizer adafactor", args.optimizer == "adafactor"))
        if given]
    if not_for_video:
        raise core.ControlNeXtError(f"{', '.join(not_for_video)}: not for SVD training (AdamW, no validation "
                                    f"samples yet): leave it out.")
    if args.meta_info_path and args.train_data_dir:
        raise core.ControlNeXtError("Give the clips once: --meta_info_path (the official file) or --train_data_dir "
                                    "(a folder of clip folders), not both.")
    video_nodes = comfy_library.pack("nodes.video_train")
    note = ""
    if args.meta_info_path:
        clips, label = video_data.read_meta_info(os.path.abspath(args.meta_info_path)), args.meta_info_path
    else:
        given = (args.dwpose_detector or video_nodes.NO_DWPOSE, args.dwpose_model or video_nodes.NO_DWPOSE)
        dwpose = [os.path.abspath(name) if os.path.isfile(name) else name for name in given]
        clips, note = video_nodes.clip_folder_clips(os.path.abspath(args.train_data_dir), *dwpose)
        label = args.train_data_dir
    log.info("%d clips in %s. %s", len(clips), label, note)
    warn_of_deepspeed("Each process keeps its own fp32 masters, AdamW moments and gradients of the trained weights: "
                      "16 bytes a weight, 24 GB for every SVD-XT weight (--train_unet official), 1.6 GB for the "
                      "attention outputs and values (--train_unet attention), which ZeRO-2 would have split.")
    report = StepReport(args.report_json, launch.rank)
    output = video_nodes.train_controlnext_svd(
        model, clip_vision, vae, clips, label, steps=args.max_train_steps, trained=TRAIN_UNET_SVD[args.train_unet],
        learning_rate=args.learning_rate, frames=args.sample_n_frames, interval_frame=args.interval_frame,
        width=args.width, height=args.height, batch_size=args.train_batch_size,
        conditioning_dropout=args.conditioning_dropout_prob, control_scale=args.controlnext_scale, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        precision=PRECISIONS[compute_precision(args, launch)], controlnext=continued_encoder(args),
        checkpoint_every=args.checkpointing_steps, resume=resume_choice(args), base_model=os.path.basename(checkpoint),
        gradient_accumulation_steps=args.gradient_accumulation_steps, official_data=bool(args.meta_info_path),
        release=output_dir, checkpoints_kept=args.checkpoints_total_limit,
        hooks_class=command_hooks(args, stop, report), data_note=note)
    return finish(output, launch, report, output_dir)
