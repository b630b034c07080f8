# Training defaults shared by every config (Detectron2's lazyconfig `train` node).
import torch

train = dict(
    output_dir="./output",
    init_checkpoint="",  # a checkpoint to load before training / the model to evaluate with --eval-only
    max_iter=90000,
    amp=dict(enabled=False),  # samantics_d2.engine.build_trainer: AMPTrainer (fp16 + GradScaler) on CUDA, bf16 autocast on CPU
    ddp=dict(  # options of create_ddp_model
        broadcast_buffers=False,
        find_unused_parameters=False,
        fp16_compression=False,
    ),
    checkpointer=dict(period=5000, max_to_keep=100),  # options of PeriodicCheckpointer
    eval_period=5000,
    log_period=20,
    device="cuda" if torch.cuda.is_available() else "cpu",
    seed=-1,  # >= 0: seed python/numpy/torch with seed + rank; < 0: a random seed, logged
)
