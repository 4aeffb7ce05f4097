"""Start a ``singularity-ds`` command on several processes, and the original Singularity's script shapes.

    python -m singularity_ds.launch local N COMMAND ...     # the deepspeed launcher, N processes here
    python -m singularity_ds.launch slurm COMMAND ...       # inside an sbatch job: srun, one per task
    python -m singularity_ds.launch original SCRIPT ARGS... # scripts/SCRIPT.sh's arguments (below)

``launchers/local.sh``, ``launchers/multinode.sh`` and ``scripts/*.sh`` are thin shells over this module,
so the launch rules (the master's address and port, the launcher, the interpreter) live in one place.

The original's scripts take ``EXP_NAME CORPUS|DATASET NGPU local|slurm [key=value ...]`` (pretrain,
train_ret, train_vqa) and ``DATASET CKPT SAVE_DIRNAME local|slurm NGPU [key=value ...]`` (eval_ret,
eval_ret_mc, eval_vqa / eval_qa); they put runs where the original does (``ret_msrvtt/msrvtt_EXP``,
``pt_CORPUS/CORPUS_EXP``, ``qa_DATASET/EXP`` under ``$SL_EXP_DIR``; an evaluation in ``SAVE_DIRNAME``
beside the checkpoint). Left out, on purpose: the copy of the code into the run folder (the run folder's
``config.yaml`` and checkpoint manifests record what ran) and ``wandb.enable=True`` (pass it: the
original turns it on, which needs a W&B login).
"""
import os
import shlex
import sys

RET = ("coco", "flickr", "msrvtt", "didemo", "anet", "ssv2_label", "ssv2_template")
QA = ("vqa", "msrvtt", "anet")
USAGE_TRAIN = "EXP_NAME {what} NGPU local|slurm [key=value ...]"
USAGE_EVAL = "DATASET CKPT SAVE_DIRNAME local|slurm NGPU [key=value ...]"
# script -> (its arguments' shape, what the second argument may be, the native command it becomes)
SCRIPTS = {
    "pretrain": (USAGE_TRAIN.format(what="CORPUS"), None,
                 lambda exp, corpus: ["train", "pretrain", f"output_dir=pt_{corpus}/{corpus}_{exp}",
                                      f"train_corpus={corpus}", f"wandb.project=sb_pt_{corpus}"]),
    "train_ret": (USAGE_TRAIN.format(what="DATASET"), RET,
                  lambda exp, ds: ["train", "train_ret", "--config", f"ret_{ds}",
                                   f"output_dir=ret_{ds}/{ds}_{exp}", f"wandb.project=sb_ret_{ds}"]),
    "train_vqa": (USAGE_TRAIN.format(what="DATASET"), QA,
                  lambda exp, ds: ["train", "train_qa", "--config", f"qa_{ds}", f"output_dir=qa_{ds}/{exp}",
                                   f"wandb.project=sb_qa_{ds}"]),
    "eval_ret": (USAGE_EVAL, RET,
                 lambda ds, ckpt, out: ["eval", "ret", f"ret_{ds}", ckpt, f"output_dir={out}"]),
    "eval_ret_mc": (USAGE_EVAL, ("msrvtt_mc",),
                    lambda ds, ckpt, out: ["eval", "mc", f"ret_{ds}", ckpt, f"output_dir={out}"]),
    "eval_vqa": (USAGE_EVAL, QA, lambda ds, ckpt, out: ["eval", "qa", f"qa_{ds}", ckpt, f"output_dir={out}"]),
}
SCRIPTS["eval_qa"] = SCRIPTS["eval_vqa"]  # the original's file is eval_vqa.sh


class LaunchError(Exception):
    pass


def _count(value: str, what: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise LaunchError(f"{what} must be a number of processes >= 1, got {value!r}")
    return int(value)


def original_command(script: str, args) -> tuple:
    """The original's ``scripts/SCRIPT.sh ARGS`` -> (mode, processes or None, the singularity-ds argv)."""
    shape, allowed, native = SCRIPTS[script]
    usage = f"usage: scripts/{script}.sh {shape}"
    if len(args) < 4:
        raise LaunchError(f"{usage} (the original's arguments)")
    if script.startswith("eval"):
        if len(args) < 5:
            raise LaunchError(usage)
        dataset, ckpt, save, mode, n, extra = args[0], args[1], args[2], args[3], args[4], args[5:]
    else:
        exp, dataset, n, mode, extra = args[0], args[1], args[2], args[3], args[4:]
    if allowed and dataset not in allowed:
        raise LaunchError(f"scripts/{script}.sh: dataset {dataset!r} is not one of {', '.join(allowed)} "
                          f"(as the original's script)")
    if mode not in ("local", "slurm"):
        raise LaunchError(f"scripts/{script}.sh: mode {mode!r}: expected local or slurm")
    procs = _count(n, "NGPU") if mode == "local" else None
    if script.startswith("eval"):
        if not os.path.exists(ckpt):
            raise LaunchError(f"scripts/{script}.sh: checkpoint {ckpt}: no such file or folder")
        # beside the checkpoint, as the original's $(dirname CKPT)/SAVE_DIRNAME (absolute: not re-rooted)
        out = os.path.join(os.path.dirname(os.path.abspath(ckpt)), save)
        argv = native(dataset, ckpt, out)
    else:
        argv = native(exp, dataset)
    return mode, procs, argv + list(extra)


def _python() -> str:
    return os.environ.get("PYTHON") or sys.executable


def local_argv(n: int, argv) -> list:
    """DeepSpeed's launcher with ``n`` processes on this machine (beside the interpreter: the venv's)."""
    bin_dir = os.path.dirname(_python())
    launcher = os.path.join(bin_dir, "deepspeed")
    if not os.path.isfile(launcher):
        launcher = "deepspeed"
    # the venv's bin first on PATH: DeepSpeed's JIT ops find its ninja and compilers, not the system's
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    return [launcher, "--num_accelerators", str(n), "--master_port", os.environ.get("MASTER_PORT", "29500"),
            "--module", "singularity_ds", *argv]


def slurm_argv(argv) -> list:
    """``srun`` inside an sbatch job: one process per task; the master is the job's first node, its port
    a function of the job id (two jobs on one node do not collide)."""
    if "SLURM_JOB_ID" not in os.environ:
        raise LaunchError("mode slurm runs inside a SLURM job: submit it with sbatch (or use local)")
    if "MASTER_ADDR" not in os.environ:
        import subprocess
        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ["MASTER_ADDR"] = nodes[0]
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ["SLURM_JOB_ID"]) % 2000))
    env = os.environ
    print(f"singularity-ds: job {env['SLURM_JOB_ID']}, {env.get('SLURM_NTASKS', '?')} processes on "
          f"{env.get('SLURM_JOB_NODELIST', '?')}, master {env['MASTER_ADDR']}:{env['MASTER_PORT']}",
          flush=True)
    return ["srun", "--kill-on-bad-exit=1", _python(), "-m", "singularity_ds", *argv]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["local"] and len(argv) >= 3:
            cmd = local_argv(_count(argv[1], "N"), argv[2:])
        elif argv[:1] == ["slurm"] and len(argv) >= 2:
            cmd = slurm_argv(argv[1:])
        elif argv[:1] == ["original"] and len(argv) >= 2 and argv[1] in SCRIPTS:
            mode, n, native = original_command(argv[1], argv[2:])
            how = f"local, {n} process(es)" if mode == "local" else "srun"
            print(f"singularity-ds: scripts/{argv[1]}.sh runs: {shlex.join(['singularity-ds', *native])} "
                  f"({how})", file=sys.stderr, flush=True)
            cmd = local_argv(n, native) if mode == "local" else slurm_argv(native)
        else:
            raise LaunchError("usage: python -m singularity_ds.launch local N COMMAND ... | slurm COMMAND "
                              f"... | original SCRIPT ARGS ... (SCRIPT: {', '.join(SCRIPTS)})")
    except LaunchError as e:
        print(f"singularity-ds: error: {e}", file=sys.stderr)
        return 2
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
