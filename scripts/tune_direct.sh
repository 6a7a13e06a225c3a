#!/usr/bin/env bash
# Searches of `make tune` run without DVC (`rcekd tune --direct`), on a machine that has no DVC, such as a
# lent GPU machine. Each search resumes from its CSV in artifacts/tuning/ (copy the committed ones along),
# and its rows name the device. What must be there: the working tree, data/processed/<dataset>, and the
# teacher's checkpoint.pt and trajectory.parquet (the teacher cache is made here, from that checkpoint).
#   usage: scripts/tune_direct.sh SECONDS SPACE...   (every search runs at once, each for at most SECONDS;
#          JOBS trials of each at once, default 4; one log per search in .tune/)
set -u
limit=$1
shift
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RCEKD_THREADS=${RCEKD_THREADS:-1}
dataset=$(python3 -c "import yaml; print(yaml.safe_load(open('params.yaml'))['dataset'])")
mkdir -p .tune
python3 -m stages.cli cache-teacher --data "data/processed/$dataset" \
  --checkpoint "artifacts/$dataset/teacher_mf/checkpoint.pt" --out "artifacts/$dataset/teacher_mf/cache" || exit 1
for space in "$@"; do
  trials=
  [ "$space" = tarec ] && trials="--trials 4"  # as make tune: TARec's two stages cost twice
  timeout "$limit" python3 -m stages.cli tune --method "${space%_edge}" --space "$space" --direct \
    --jobs "${JOBS:-4}" $trials >".tune/$space.log" 2>&1 &
done
wait
pkill -f "stages.cli (train|distill)" || true  # trials cut short by the limit
tail -n 3 .tune/*.log
