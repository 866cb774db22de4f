#!/usr/bin/env bash
# Issue 19's accuracy sweep for one model: routers calibrated here (or given), then, at each target mean
# density and granularity, zero-shot accuracy on the eight tasks of ../shared/data/eval and WikiText-2
# perplexity for each selection rule (topk, threshold, stat-topk; uniform and calibrated schedules) beside
# the fixed top-k baselines (router, oracle, static, random), each run reporting the mean density it
# reached; then one CSV row per (rule, granularity, density) and a plot of accuracy against the density
# reached. scripts/gpu-check.sh's `adaptive` stage runs it on the GPU at full scale; on the CPU it runs at
# any scale (EVAL_LIMIT, PPL_TOKENS, CALIB_TOKENS) to check that it works.
#
#   scripts/adaptive-sweep.sh MODEL OUTDIR
#
# Environment:
#   POLAR          the polar binary (default build/src/polar)
#   DEVICE         cpu or cuda (default cpu)
#   POLAR_SHARED   the shared data (default ../shared beside the repo)
#   ROUTERS        a router file from polar calibrate with selection statistics; default: calibrate into
#                  OUTDIR with CALIB_TOKENS tokens (default 60000) and CALIB_EPOCHS epochs (default 40)
#   DENSITIES      target mean densities, comma-separated (default 0.33,0.5,0.67,0.8)
#   GRANULARITIES  default "group head"
#   EVAL_LIMIT     items per task (default 400: a paired standard error of the 8-task mean below 1 point
#                  for this model; 0 = every item; -1 = no evaluation, perplexity only)
#   PPL_TOKENS     WikiText-2 tokens scored (default 16384), CTX its window (default 512)
#   RULES          which runs (default all): router-topk router-topk-cal threshold threshold-cal stat-topk
#                  stat-topk-cal oracle static random
#   KMAX           --kmax of the threshold rules (default 0: every unit)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: scripts/adaptive-sweep.sh MODEL OUTDIR}
out=${2:?usage: scripts/adaptive-sweep.sh MODEL OUTDIR}
POLAR=${POLAR:-build/src/polar}
DEVICE=${DEVICE:-cpu}
shared=${POLAR_SHARED:-../shared}
DENSITIES=${DENSITIES:-0.33,0.5,0.67,0.8}
GRANULARITIES=${GRANULARITIES:-"group head"}
EVAL_LIMIT=${EVAL_LIMIT:-400}
PPL_TOKENS=${PPL_TOKENS:-16384}
CTX=${CTX:-512}
RULES=${RULES:-"router-topk router-topk-cal threshold threshold-cal stat-topk stat-topk-cal oracle static random"}
KMAX=${KMAX:-0}
mkdir -p "$out"
log() { echo "[adaptive-sweep] $*" >&2; }

routers=${ROUTERS:-}
if [ -z "$routers" ]; then
  routers="$out/routers.safetensors"
  if [ ! -f "$routers" ]; then
    log "calibrating ${CALIB_TOKENS:-60000} tokens on $DEVICE"
    "$POLAR" calibrate --device "$DEVICE" --model "$model" \
      --text "$shared/data/text/wikitext2_valid_tokens.txt" "$shared/data/text/c4_sample.jsonl" \
      --out "$routers" --work "$out/calib-work" --tokens "${CALIB_TOKENS:-60000}" --seed 0 \
      --epochs "${CALIB_EPOCHS:-40}" --lr 5e-4 > "$out/calibrate.log" 2>&1 || { tail -20 "$out/calibrate.log"; exit 1; }
  fi
fi

tasks=()
for t in "$shared"/data/eval/*.jsonl; do tasks+=(--task "$t"); done
# The flags of each run: name -> selector and selection flags.
declare -A flags=(
  [router-topk]="--routers $routers"
  [router-topk-cal]="--routers $routers --density-schedule calibrated"
  [threshold]="--routers $routers --selection threshold --kmax $KMAX"
  [threshold-cal]="--routers $routers --selection threshold --kmax $KMAX --density-schedule calibrated"
  [stat-topk]="--routers $routers --selection stat-topk --kmax $KMAX"
  [stat-topk-cal]="--routers $routers --selection stat-topk --kmax $KMAX --density-schedule calibrated"
  [oracle]="--selector oracle"
  [static]="--selector static --routers $routers"
  [random]="--selector random"
)
# Dense perplexity first: the runs below are compared with it (and a sweep cut short keeps it).
"$POLAR" perplexity --device "$DEVICE" --model "$model" --text "$shared/data/text/wikitext2_test.txt" --ctx "$CTX" \
  --max-tokens "$PPL_TOKENS" --json > "$out/ppl-dense.json" 2> "$out/ppl-dense.log"
for gran in $GRANULARITIES; do
  for rule in $RULES; do
    read -r -a f <<< "${flags[$rule]:?unknown rule $rule}"
    name="$rule-$gran"
    if [ "$EVAL_LIMIT" -ge 0 ]; then
      log "eval $name at densities $DENSITIES ($EVAL_LIMIT items per task)"
      "$POLAR" eval --device "$DEVICE" --model "$model" "${tasks[@]}" --limit "$EVAL_LIMIT" --json \
        --density "$DENSITIES" --granularity "$gran" "${f[@]}" > "$out/eval-$name.json" 2> "$out/eval-$name.log" ||
        { tail -5 "$out/eval-$name.log"; continue; }
    fi
    log "perplexity $name at densities $DENSITIES"
    for d in ${DENSITIES//,/ }; do
      "$POLAR" perplexity --device "$DEVICE" --model "$model" --text "$shared/data/text/wikitext2_test.txt" \
        --ctx "$CTX" --max-tokens "$PPL_TOKENS" --json --density "$d" --granularity "$gran" "${f[@]}" \
        > "$out/ppl-$name-d$d.json" 2> "$out/ppl-$name-d$d.log" || tail -5 "$out/ppl-$name-d$d.log"
    done
  done
done

# One row per (run, granularity, target density): the density reached, the 8-task mean accuracy, the mean of
# the per-task paired differences to dense (points) with its standard error sqrt(Σ se²) / n, and perplexity.
python3 - "$out" <<'PY'
import csv, glob, json, math, os, re, sys
out = sys.argv[1]
def load(path):
    return json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) else None
dense_ppl = load(f"{out}/ppl-dense.json")["perplexity"]
# (run name, density) -> the tasks of its eval run, and -> its perplexity run
evals, ppls = {}, {}
for path in glob.glob(f"{out}/eval-*.json"):
    j = load(path)
    for t in (j["tasks"] if j else []):
        if t["density"] < 1:
            evals.setdefault((os.path.basename(path)[5:-5], t["density"]), []).append(t)
for path in glob.glob(f"{out}/ppl-*-d*.json"):
    m = re.match(r"ppl-(.*)-d([0-9.]+)\.json$", os.path.basename(path))
    if m and load(path):
        ppls[(m.group(1), float(m.group(2)))] = load(path)
rows = []
for name, density in sorted(set(evals) | set(ppls)):
    rule, gran = name.rsplit("-", 1)
    tasks, ppl = evals.get((name, density), []), ppls.get((name, density), {})
    deltas = [t["delta_acc"] for t in tasks if "delta_acc" in t]
    rows.append({
        "rule": rule, "granularity": gran, "density": density,
        "density_reached": tasks[0].get("density_reached") if tasks else None,
        "ppl_density_reached": ppl.get("density_reached"),
        "items": sum(t["n"] for t in tasks),
        "avg_acc": sum(t["acc"]["mean"] for t in tasks) / len(tasks) if tasks else None,
        "avg_d_acc_points": 100 * sum(d["mean"] for d in deltas) / len(deltas) if deltas else None,
        "se_points": 100 * math.sqrt(sum(d["se"] ** 2 for d in deltas)) / len(deltas) if deltas else None,
        "perplexity": ppl.get("perplexity"), "dense_perplexity": dense_ppl})
with open(f"{out}/adaptive.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["rule"])
    w.writeheader()
    w.writerows(rows)
nan = float("nan")
def num(x):
    return nan if x is None else x
print(f"{'rule':<16} {'gran':<5} {'target':>6} {'reached':>7} {'avg acc':>7} {'d_acc ± se (pts)':>17} {'ppl':>9} {'(reached)':>9}")
for r in rows:
    print(f"{r['rule']:<16} {r['granularity']:<5} {r['density']:>6.3g} {num(r['density_reached']):>7.3f} "
          f"{num(r['avg_acc']):>7.3f} {num(r['avg_d_acc_points']):>+8.2f} ± {num(r['se_points']):<6.2f} "
          f"{num(r['perplexity']):>9.2f} {num(r['ppl_density_reached']):>9.3f}")
print(f"dense perplexity {dense_ppl:.2f}")
PY
# Accuracy change (adaptive.png) and perplexity (adaptive-ppl.png, log scale) against the density reached,
# one line per rule and granularity (gnuplot, where present).
if command -v gnuplot >/dev/null; then
  python3 - "$out" <<'PY' > "$out/adaptive.gp"
import csv, sys
out = sys.argv[1]
rows = list(csv.DictReader(open(f"{out}/adaptive.csv")))
def plot(png, ylabel, x, y, err, extra=""):
    pts = [r for r in rows if r[x] and r[y]]
    series = sorted({(r["rule"], r["granularity"]) for r in pts})
    if not series:  # nothing measured (no evaluation, or no perplexity): no plot
        return
    print(f"set terminal pngcairo size 1000,650\nset output '{out}/{png}'\n{extra}")
    print(f"set xlabel 'mean density reached'\nset ylabel '{ylabel}'\nset key outside right\nset grid")
    style = "using 1:2:3 with yerrorlines" if err else "using 1:2 with linespoints"
    print("plot " + ", ".join(f"'-' {style} title '{r} ({g})'" for r, g in series))
    for rule, gran in series:
        for r in sorted((r for r in pts if (r["rule"], r["granularity"]) == (rule, gran)), key=lambda r: float(r[x])):
            print(r[x], r[y], r[err] if err else "")
        print("e")
    print("unset logscale")
plot("adaptive.png", "mean paired accuracy change (points)", "density_reached", "avg_d_acc_points", "se_points")
plot("adaptive-ppl.png", "WikiText-2 perplexity", "ppl_density_reached", "perplexity", None, "set logscale y")
PY
  gnuplot "$out/adaptive.gp" || log "plot failed"
fi
