# Two commands for a newcomer (see README.md):
#   make run    set up .venv, then `dvc repro` the default pipeline (CiteULike-t, MF → MF)
#   make test   set up .venv, then run the test suite (unit tests + a small end-to-end DVC run)
#   make tune   every validation search of params `tuning` (hours on a CPU), then README's tables
#   make record the protocols of record (params `records`: hours on a CPU), cell by cell into results/, and README's tables
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup run test plots tune record
setup: $(VENV)/.installed

# The CPU build of torch first (a local wheel on the project's machines); the CPU index elsewhere.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 || \
	  $(BIN)/pip install --quiet 'torch>=2.2,<3' --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: setup
	dvc repro

test: setup
	python -m pytest -q -n auto --dist loadfile

JOBS ?= 2

# Every MF -> MF search of tuning.spaces, one after another; each trial lands in its search's CSV as it
# finishes, and a rerun runs only the trials missing there; TaReC with 4 trials; the edges last.
SEARCHES ?= student rcekd ce cd rrd dcd unkd sld hetcomp tarec
tune: setup
	dvc repro cache_teacher
	for space in $(SEARCHES); do \
	  rcekd tune --method $$space --jobs $(JOBS) $$( [ $$space = tarec ] && echo --trials 4 ) || exit 1; \
	done
	for space in $$(python -c "import yaml; print(' '.join(k for k in yaml.safe_load(open('params.yaml'))['tuning']['spaces'] if k.endswith('_edge')))"); do \
	  rcekd tune --method $${space%_edge} --space $$space --jobs $(JOBS) || exit 1; \
	done
	rcekd readme

# The protocols of record (README "Results of record"): each record's cells on the queue, each landing in
# results/<name> as it finishes (run again, only the missing cells run); then README's tables.
record: setup
	rcekd record --name citeulike_mf --jobs $(JOBS)
	rcekd record --name citeulike_mf_ablations --jobs $(JOBS)
	rcekd readme

# The figures as one offline HTML page (dvc_plots/index.html): Vega inlined, no CDN needed.
plots: setup
	rcekd html-template --out .dvc/tmp/offline.html
	dvc plots show --html-template .dvc/tmp/offline.html
