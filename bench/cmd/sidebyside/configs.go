package main

// kind is how a configuration is measured.
type kind string

const (
	kindQEMU      kind = "qemu"       // two QEMU processes, QMP, loopback TCP
	kindMigctl    kind = "migctl"     // two migctl serve processes, QMP, loopback TCP
	kindRaw       kind = "raw"        // rawcopy recv + send
	kindRawWrite  kind = "raw-write"  // rawcopy write
	kindMappedRAM kind = "mapped-ram" // one migctl serve saving to file: with mapped-ram
)

// config is one thing measured in every round.
type config struct {
	Name    string `json:"name"`
	Label   string `json:"label"`
	Kind    kind   `json:"kind"`
	Prepare bool   `json:"prepared_destination"` // QEMU -mem-prealloc; migctl --guest prealloc=on
	Multifd int    `json:"multifd_channels,omitempty"`
	Streams int    `json:"streams,omitempty"` // raw
	Clock   string `json:"clock"`             // where its clock starts and stops
}

// Where each clock starts and stops; printed with the results and in
// bench/README.md.
const (
	clockQEMU = "throughput = ram.transferred / total-time of the source's query-migrate. QEMU's total-time starts when " +
		"the migrate command is handled (migrate_init) and stops when the source's migration thread has flushed its last " +
		"byte (migration_calculate_complete), QEMU_CLOCK_REALTIME in ms; it does not wait for the destination to load it."
	clockMigctl = "throughput = ram.transferred / total-time of the source's query-migrate. migctl's total-time starts when " +
		"the migrate command starts the engine (engine.Start) and stops after the destination confirmed over the return " +
		"path that its guest runs (SHUT 0), in ms."
	clockRaw = "throughput = bytes / the sender's clock: it starts just before the first connect and stops when the last " +
		"stream's one-byte answer arrives, sent by the receiver after it read the stream's last byte into its region " +
		"(pre-faulted before the clock)."
	clockRawWrite = "throughput = bytes / the writer's clock: from before open(O_CREAT|O_TRUNC) to after close(), 4 MiB " +
		"write(2) calls from a resident buffer, no fsync."
	clockMappedRAM = "throughput = ram.transferred / total-time of the saving migctl serve's query-migrate (migrate command " +
		"→ completed; the file is left in the page cache, not synced)."
	clockTrueDowntime = "true downtime = the destination's RESUME event timestamp − the source's STOP event timestamp " +
		"(QMP event timestamps: wall clock, µs, one host). Both QEMU and migctl emit STOP after the source's guest " +
		"stopped and RESUME just before the destination's guest runs."
	clockDestStart = "destination start = from starting the destination process to its first query-status answer " +
		"(includes -mem-prealloc or prealloc=on; for raw, the region's pre-fault alone)."
	clockRSS = "destination RSS = VmHWM (peak resident set) of the destination process after the migration, over the " +
		"guest's RAM size."
)

// configs are measured in this order in even rounds and in the reverse
// order in odd rounds, so that each pair of neighbours sees the machine in
// the same state on average.
var configs = []config{
	{Name: "qemu-plain", Label: "QEMU 7.2, destination default", Kind: kindQEMU, Clock: clockQEMU},
	{Name: "migctl-plain", Label: "migctl, destination default", Kind: kindMigctl, Clock: clockMigctl},
	{Name: "qemu-prealloc", Label: "QEMU 7.2, destination -mem-prealloc", Kind: kindQEMU, Prepare: true, Clock: clockQEMU},
	{Name: "migctl-prepared", Label: "migctl, destination prealloc=on", Kind: kindMigctl, Prepare: true, Clock: clockMigctl},
	{Name: "raw-1", Label: "raw: 1 TCP stream into pre-faulted memory", Kind: kindRaw, Streams: 1, Clock: clockRaw},
	{Name: "raw-4", Label: "raw: 4 TCP streams into pre-faulted memory", Kind: kindRaw, Streams: 4, Clock: clockRaw},
	{Name: "migctl-multifd4", Label: "migctl multifd ×4, destination prealloc=on", Kind: kindMigctl, Prepare: true, Multifd: 4, Clock: clockMigctl},
	{Name: "qemu-multifd4", Label: "QEMU 7.2 multifd ×4, destination -mem-prealloc", Kind: kindQEMU, Prepare: true, Multifd: 4, Clock: clockQEMU},
	{Name: "migctl-mapped-ram", Label: "migctl mapped-ram save to file:", Kind: kindMappedRAM, Clock: clockMappedRAM},
	{Name: "raw-write", Label: "raw: page-cache write of the same bytes", Kind: kindRawWrite, Clock: clockRawWrite},
}

// metric names a figure of a sample.
type metric string

const (
	metricThroughput   metric = "throughput_gbps"           // Bytes / TotalMS
	metricStartPlusRun metric = "start_plus_transfer_gbps"  // Bytes / (DestStartMS + TotalMS)
	metricTrueDowntime metric = "true_downtime_ms"          // STOP → RESUME
	metricRSSRatio     metric = "destination_rss_per_guest" // VmHWM / guest RAM
)

// comparison is one row of the result: a candidate's figure over its
// baseline's, each round's pair taken from the same round.
type comparison struct {
	Name      string `json:"name"`
	Candidate string `json:"candidate"`
	Baseline  string `json:"baseline"`
	Metric    metric `json:"metric"`
	// Goal is issue 8's goal for this row, as text; GoalRatio/GoalMax make
	// it checkable: the median paired ratio must reach GoalRatio, or the
	// candidate's median stay at or under GoalMax.
	Goal      string  `json:"goal,omitempty"`
	GoalRatio float64 `json:"goal_ratio,omitempty"`
	GoalMax   float64 `json:"goal_max,omitempty"`
}

var comparisons = []comparison{
	{Name: "migctl vs QEMU plain", Candidate: "migctl-plain", Baseline: "qemu-plain", Metric: metricThroughput},
	{Name: "migctl prepared vs QEMU -mem-prealloc", Candidate: "migctl-prepared", Baseline: "qemu-prealloc", Metric: metricThroughput,
		Goal: "≥ 1.2×", GoalRatio: 1.2},
	{Name: "migctl prepared, start + transfer, vs QEMU plain", Candidate: "migctl-prepared", Baseline: "qemu-plain", Metric: metricStartPlusRun,
		Goal: "≥ 3×", GoalRatio: 3},
	{Name: "migctl prepared vs raw one-stream ceiling", Candidate: "migctl-prepared", Baseline: "raw-1", Metric: metricThroughput,
		Goal: "≥ 0.8×", GoalRatio: 0.8},
	{Name: "raw one-stream ceiling vs QEMU -mem-prealloc (for scale)", Candidate: "raw-1", Baseline: "qemu-prealloc", Metric: metricThroughput,
		Goal: "≈ 1.4× here (issue 8)"},
	{Name: "migctl multifd ×4 vs 4 raw streams", Candidate: "migctl-multifd4", Baseline: "raw-4", Metric: metricThroughput,
		Goal: "≥ 0.9×", GoalRatio: 0.9},
	{Name: "migctl multifd ×4 vs QEMU multifd ×4 -mem-prealloc", Candidate: "migctl-multifd4", Baseline: "qemu-multifd4", Metric: metricThroughput,
		Goal: "≥ 1.2×", GoalRatio: 1.2},
	{Name: "mapped-ram save vs raw page-cache write", Candidate: "migctl-mapped-ram", Baseline: "raw-write", Metric: metricThroughput,
		Goal: "≥ 0.8×", GoalRatio: 0.8},
	{Name: "true downtime, migctl vs QEMU (destination default)", Candidate: "migctl-plain", Baseline: "qemu-plain", Metric: metricTrueDowntime,
		Goal: "migctl ≤ 5 ms", GoalMax: 5},
	{Name: "true downtime, migctl prepared vs QEMU -mem-prealloc", Candidate: "migctl-prepared", Baseline: "qemu-prealloc", Metric: metricTrueDowntime,
		Goal: "migctl ≤ 5 ms", GoalMax: 5},
	{Name: "destination RSS / guest RAM, migctl prepared vs QEMU -mem-prealloc", Candidate: "migctl-prepared", Baseline: "qemu-prealloc", Metric: metricRSSRatio,
		Goal: "migctl ≤ 1.05", GoalMax: 1.05},
}
