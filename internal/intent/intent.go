// Package intent is migctl's intended behaviour, written down by hand and
// independently of transitions.yaml, for tests to hold the spec (and the
// guards that read it) against. A test that took its expected values from
// the spec would pass with the spec broken; these tables do not move when
// the spec does.
package intent

// Mutable says, per side and state, whether capabilities and non-live
// parameters may change there:
//   - outgoing: frozen exactly while QEMU's migration_is_running() is true
//     (migration.c: setup, active, pre-switchover, device, cancelling,
//     failing and every postcopy state, and migctl's switchover states
//     committed and unknown-outcome); mutable in none and in the states
//     a new migrate starts from (completed, cancelled, failed);
//   - incoming: mutable before the source connects (none, setup,
//     listening) and once the migration ended (completed, failed,
//     cancelled), as QEMU allows; frozen from connected through the
//     postcopy states, migctl's loaded and unknown-outcome, and while
//     cancelling. QEMU allows changes in those
//     states: that is the bug this project closes.
var Mutable = map[string]map[string]bool{
	"outgoing": {
		"none": true, "setup": false, "active": false, "pre-switchover": false, "device": false,
		"committed": false, "unknown-outcome": false,
		"postcopy-device": false, "postcopy-active": false, "postcopy-paused": false, "postcopy-recover-setup": false, "postcopy-recover": false,
		"completed": true, "cancelling": false, "cancelled": true, "failing": false, "failed": true,
	},
	"incoming": {
		"none": true, "setup": true, "listening": true, "connected": false, "active": false,
		"postcopy-device": false, "postcopy-active": false, "postcopy-paused": false, "postcopy-recover-listening": false,
		"postcopy-recover": false, "cancelling": false,
		"loaded": false, "unknown-outcome": false,
		"completed": true, "failed": true, "cancelled": true,
	},
}
