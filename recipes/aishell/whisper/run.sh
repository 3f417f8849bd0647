#!/usr/bin/env bash
# WeNet's AISHELL Whisper fine-tuning with wenet_hooks: the same training
# command, a `wenet_hooks:` section in the train yaml, and no conversion stage
# (WeNet's stage 1 ran zero_to_fp32.py on every folder, then rm -rf'd it).
#
# Run it from WeNet's examples/aishell/whisper after WeNet's data preparation
# (data/train/data.list, data/dev/data.list, data/test/data.list exist):
#   cd $WENET_ROOT/examples/aishell/whisper
#   bash /path/to/wenet_hooks/recipes/aishell/whisper/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

stage=${stage:-0}
stop_stage=${stop_stage:-2}
dir=${dir:-exp/finetune_whisper_largev3}
checkpoint=${checkpoint:-exp/whisper/large-v3/wenet_whisper.init-ctc.pt}
data_type=${data_type:-raw}
num_gpus=${num_gpus:-$(echo "${CUDA_VISIBLE_DEVICES:-0}" | awk -F "," '{print NF}')}
deepspeed_config=${deepspeed_config:-$here/conf/ds_stage1.json}   # ds_stage2.json, ds_stage3.json
deepspeed_save_states=${deepspeed_save_states:-model+optimizer}    # or model_only
average_num=${average_num:-5}
base_config=${base_config:-conf/finetune_whisper_largev3.yaml}
train_config=$dir/train_with_hooks.yaml

if [ "$stage" -le 0 ] && [ "$stop_stage" -ge 0 ]; then
  mkdir -p "$dir"
  # WeNet's own config, plus the one section wenet_hooks reads.
  cat "$base_config" "$here/conf/wenet_hooks.yaml" > "$train_config"
  torchrun --standalone --nproc_per_node "$num_gpus" wenet/bin/train.py \
    --train_engine deepspeed --config "$train_config" \
    --data_type "$data_type" --train_data data/train/data.list --cv_data data/dev/data.list \
    ${checkpoint:+--checkpoint $checkpoint} --model_dir "$dir" --tensorboard_dir tensorboard \
    --ddp.dist_backend nccl --num_workers 8 --prefetch 10 --pin_memory \
    --deepspeed_config "$deepspeed_config" --deepspeed.save_states "$deepspeed_save_states"
fi

# (No stage 1: every exp/<tag>.pt is already a verified single file. For old
#  experiments: wenet-hooks-convert model_dir=$dir)

if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  decode_checkpoint=$dir/avg_${average_num}.pt
  python wenet/bin/average_model.py --dst_model "$decode_checkpoint" --src_path "$dir" \
    --num "$average_num" --val_best
  python wenet/bin/recognize.py --gpu 0 --modes attention ctc_greedy_search \
    --config "$dir/train.yaml" --data_type "$data_type" --test_data data/test/data.list \
    --checkpoint "$decode_checkpoint" --beam_size 10 --batch_size 32 --ctc_weight 0.3 \
    --result_dir "$dir/decode"
fi
