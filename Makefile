# The project's commands. Each brings up the local infrastructure it needs (PostgreSQL, the
# tansu broker, the schema registry; see deploy/local/infra.sh) and stops what it started.

INFRA := deploy/local/infra.sh

.PHONY: demo test contracts bench lint infra-up infra-down infra-status fault-soak

## make demo: the whole flow on a local broker and database, with a summary.
demo:
	cargo build --workspace --bins
	$(INFRA) run cargo run --quiet -p ferrybox-e2e --bin demo

## make test: formatting, lints, contracts and every test in the workspace (what CI runs).
test: lint contracts
	$(INFRA) run cargo test --workspace --all-features --no-fail-fast

## make bench: benchmark tables, one `ratio <name> <value>` line per comparison (release build).
bench:
	cargo build --release -p ferrybox-e2e --bin bench
	$(INFRA) run cargo run --release --quiet -p ferrybox-e2e --bin bench

## make fault-soak: the fault test of the real binaries (tests/fault) with SEEDS random seeds
## (default 10) and KILLS kills each (default 100); each run prints its seed, and
## FERRYBOX_FAULT_SEED=<seed> reruns one.
fault-soak:
	$(INFRA) run sh -c 'for i in $$(seq 1 $${SEEDS:-10}); do \
		FERRYBOX_FAULT_KILLS=$${KILLS:-100} cargo test --workspace --all-features --test fault -- --nocapture || exit 1; \
	done'

## make contracts: every consumer can read every version its producers published, and
## schemas/asyncapi.json is what schemas/ and the contracts say now. No server.
contracts:
	cargo run --quiet -p ferrybox --features cli --bin ferrybox-contracts -- check
	cargo run --quiet -p ferrybox --features cli --bin ferrybox-contracts -- asyncapi --check

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --all-features -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --quiet -p ferrybox -p ferrybox-macros --no-deps --all-features

infra-up:
	$(INFRA) up

infra-down:
	$(INFRA) down

infra-status:
	$(INFRA) status
