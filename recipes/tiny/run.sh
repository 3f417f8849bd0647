#!/usr/bin/env bash
# The wenet_hooks flow on a tiny model that a CPU trains in a couple of minutes:
# synthetic data -> WeNet training with DeepSpeed ZeRO on 2 CPU ranks -> a
# recognize-ready exp/tiny/epoch_N.pt at every save -> recognize -> average.
# There is no conversion stage: the hook wrote the single files during training.
#
#   WENET_ROOT=/path/to/wenet bash recipes/tiny/run.sh
#   ds_config=recipes/tiny/conf/ds_stage3.json save_states=model_only bash recipes/tiny/run.sh
#   train_config=recipes/tiny/conf/train_whisper.yaml checkpoint=init.pt bash recipes/tiny/run.sh
set -euo pipefail
: "${WENET_ROOT:?set WENET_ROOT to your WeNet checkout}"
here=$(cd "$(dirname "$0")" && pwd)

stage=${stage:-0}
stop_stage=${stop_stage:-3}
data=${data:-data/tiny}
dir=${dir:-exp/tiny}
nproc=${nproc:-2}
ds_config=${ds_config:-$here/conf/ds_stage2.json}
save_states=${save_states:-model+optimizer}  # or model_only: no sharded folder at all
train_config=${train_config:-$here/conf/train.yaml}  # or conf/train_whisper.yaml (with checkpoint=...)

export PYTHONPATH=$WENET_ROOT${PYTHONPATH:+:$PYTHONPATH}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "$stage" -le 0 ] && [ "$stop_stage" -ge 0 ]; then
  python "$here/local/make_data.py" "$data"
fi

if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  mkdir -p "$dir"
  overrides=()
  if grep -q "^tokenizer: char" "$train_config"; then
    overrides=(--override_config "tokenizer_conf.symbol_table_path $data/lang_char.txt")
  fi
  # The usual WeNet command: wenet_hooks is active because train.yaml has its section.
  torchrun --standalone --nproc_per_node "$nproc" "$WENET_ROOT/wenet/bin/train.py" \
    --train_engine deepspeed --device cpu --ddp.dist_backend gloo \
    --deepspeed_config "$ds_config" --deepspeed.save_states "$save_states" \
    --config "$train_config" \
    "${overrides[@]}" \
    --data_type raw --train_data "$data/data.list" --cv_data "$data/data.list" \
    --model_dir "$dir" --tensorboard_dir "$dir/tensorboard" --num_workers 1 ${checkpoint:+--checkpoint $checkpoint}
fi

if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  python "$WENET_ROOT/wenet/bin/recognize.py" --device cpu --gpu -1 \
    --config "$dir/train.yaml" --data_type raw --test_data "$data/data.list" \
    --checkpoint "$dir/final.pt" --beam_size 2 --batch_size 1 --ctc_weight 0.3 \
    --modes ctc_greedy_search attention_rescoring --result_dir "$dir/decode"
fi

if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  # Both ways WeNet's recipes average: by validation loss (<tag>.yaml -> <tag>.pt), and the newest
  # model_dir/[!init]*.pt by mtime, which takes anything ending in .pt for a model.
  python "$WENET_ROOT/wenet/bin/average_model.py" --dst_model "$dir/avg_2.pt" \
    --src_path "$dir" --num 2 --val_best --mode epoch
  # The average is named .pt too: recognize.py's load_checkpoint reads re.sub('.pt$', '.yaml', path)
  # as the info yaml, which for any other name is the (binary) model file itself.
  python "$WENET_ROOT/wenet/bin/average_model.py" --dst_model "$dir/avg_newest.pt" \
    --src_path "$dir" --num 2
  python "$WENET_ROOT/wenet/bin/recognize.py" --device cpu --gpu -1 \
    --config "$dir/train.yaml" --data_type raw --test_data "$data/data.list" \
    --checkpoint "$dir/avg_newest.pt" --beam_size 2 --batch_size 1 \
    --modes ctc_greedy_search --result_dir "$dir/decode_avg"
fi
