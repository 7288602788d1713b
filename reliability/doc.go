// Package reliability holds migctl's fault matrix: tests that break a real
// migration between two `migctl serve` processes at every state of the
// spec, over every transport with a byte stream, with every fault, and
// check what must hold whatever breaks. It has no code of its own beyond
// this documentation; everything is in its tests.
//
// # Cells
//
// A cell is (transport, side:state, fault):
//
//   - transport: tcp, unix, fd (socket pairs passed with getfd over the QMP
//     unix socket), exec (a command on each side piping to a socket), file
//     (a save that a failing write breaks: RLIMIT_FSIZE lowered on the
//     source process). rdma rows are listed as not in the matrix yet,
//     with where their faults are tested.
//   - side:state: every state of the spec's incoming and outgoing graphs,
//     enumerated with spec.Load from transitions.yaml. A state a
//     transport or its capability set cannot reach is listed with the
//     reason; postcopy states are listed as pending (issue 11),
//     with where their faults are tested. A cell
//     reaches its state as a migration does (pre-switchover with
//     pause-before-switchover on), or after a prelude: a cancel (cancelling,
//     cancelled), a cut (failing, failed, unknown-outcome).
//   - fault: the proxy's (internal/fault: cut, stall, corrupt a byte in either
//     direction, trickle, reset one direction), or kill -9 or SIGSTOP of
//     either process; for file, a write that fails.
//
// Each process is started with `--x-hold side:state`: the first time the
// side enters the state, the goroutine that moved it is held (outside the
// controller lock) and the X_MIGCTL_HOLD event says so. The test applies
// the fault at that moment, then releases the hold (x-migctl-release): a
// cell is triggered by a state, never by a byte count.
//
// # What every cell checks
//
//   - Never both guests running, over the whole run: each guest appends its
//     run intervals on CLOCK_MONOTONIC to a file that survives kill -9
//     (--guest runlog=PATH); an interval left open by a killed process ends
//     when it was reaped. Source, destination and the follow-up's new
//     destination are compared pairwise.
//   - Where the source survives, its guest is intact: every page verified
//     (x-migctl-verify-guest), and running again after a failure before
//     the commit.
//   - Where the source was killed, the destination ran its guest only if it
//     had received the source's go (its incoming side reached completed by
//     the trigger complete).
//   - Each surviving side reaches, within the bound, a terminal state or a
//     declared operator-wait state (unknown-outcome; a destination's
//     listening), and one the hand-written table of the test allows for
//     (held state's class, fault).
//   - Afterwards a migration from the surviving source (after cont, or
//     x-migctl-resolve-switchover with destination-gone in unknown-outcome)
//     to a new destination process completes and the new guest verifies.
//
// The final states each side may end in come from a hand-written table
// (outcomes, in cells_test.go), keyed by the held state's class and the
// fault, for two-way and one-way transports apart, each row with why.
// A cell that fails is a bug in migctl or in the test: fix it, or report
// it (the page lists it as failed) — never widen its row to make it pass.
//
// # Running it
//
// By default (go test -race ./reliability/, as CI does) a pairwise subset
// runs: every pair of state × fault, fault × transport and state ×
// transport that some runnable cell has appears at least once (about a
// quarter of the cells). Environment:
//
//   - MIGCTL_FULL_MATRIX=1 runs every cell; the script .ci/fault-matrix
//     does, under -race, and regenerates the matrix section of
//     docs/reliability.md (MIGCTL_MATRIX_RUN, a -run pattern over
//     transport/side:state/fault, or MIGCTL_MATRIX_CELLS limit it).
//   - MIGCTL_MATRIX_CELLS=a,b runs only the cells whose name contains a
//     or b (e.g. tcp/outgoing:committed/ or unix/incoming:loaded/cut).
//   - MIGCTL_MATRIX_OUT=FILE appends each cell's result to FILE (JSON
//     lines); MIGCTL_RELIABILITY_RESULTS=FILE (or keep) makes
//     TestWriteReliabilityDoc write the page's section from it.
//
// TestReliabilityDocFresh checks, without running a cell, that the
// page's tables list exactly the cells the spec, transports and faults
// make now.
package reliability
