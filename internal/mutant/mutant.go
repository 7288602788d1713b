// Package mutant holds the switches of migctl's mutation tests. Each
// switch removes one protected behaviour when its build tag is given, so
// that CI can show that the test protecting that behaviour fails without
// it (.ci/mutants lists tag, package and test). Without tags every switch
// is false; production builds never set them.
package mutant

// Active lists the mutant build tags this binary was built with, so that a
// test that builds another binary (cmd/migctl's) can build it alike.
var Active []string

// The switches, each set to true by the file of its build tag.
var (
	// SkipSwitchoverAckWait (tag mutant_switchover_ack): the source
	// switches over without waiting for the destination's SWITCHOVER_ACK.
	SkipSwitchoverAckWait bool
	// MutableRunning (tag mutant_mutable_running): the default spec marks
	// the incoming side's connected and active states mutable.
	MutableRunning bool
	// LossyEvents (tag mutant_lossy_events): a subscription drops state
	// events when its subscriber is behind, as it did before they were
	// made lossless.
	LossyEvents bool
	// KeepEndpoint (tag mutant_keep_endpoint): a side keeps its transport
	// after its migration ended, so new changes are judged against it.
	KeepEndpoint bool
	// NoContract (tag mutant_no_contract): the controller accepts a spec
	// that lacks states and triggers the Go code uses.
	NoContract bool
	// ResumeAfterCommit (tag mutant_resume_after_commit): the source
	// restarts its guest after any failure, even once it committed the
	// switchover (the split brain the commit protocol prevents).
	ResumeAfterCommit bool
)
