package qmp

import (
	"strconv"
	"strings"
	"time"

	"github.com/migctl/migctl/internal/safe"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
)

// MigrationInfo is query-migrate's result, with QEMU's member names. Only
// the members QEMU would fill for the current states are set; before any
// migration it is {}.
type MigrationInfo struct {
	Status           string          `json:"status,omitempty"`
	RAM              *MigrationStats `json:"ram,omitempty"`
	TotalTime        *int64          `json:"total-time,omitempty"`
	ExpectedDowntime *int64          `json:"expected-downtime,omitempty"`
	Downtime         *int64          `json:"downtime,omitempty"`
	SetupTime        *int64          `json:"setup-time,omitempty"`
	ErrorDesc        string          `json:"error-desc,omitempty"`
	// CPUThrottlePercentage is auto-converge's throttle, present while it
	// throttles (QEMU's cpu-throttle-percentage).
	CPUThrottlePercentage *int `json:"cpu-throttle-percentage,omitempty"`
	// SocketAddress lists the addresses a destination listens on (with the
	// real port of a tcp:…:0 listener).
	SocketAddress []SocketAddress `json:"socket-address,omitempty"`
	// XMigctlStalledMs (migctl extension) is how long the peer has been
	// silent, once it missed two keepalives (x-migctl-keepalive), before
	// x-migctl-io-timeout ends the migration.
	XMigctlStalledMs *int64 `json:"x-migctl-stalled-ms,omitempty"`
	// XMigctlTrueDowntimeUs (migctl extension, µs) is the guest's true
	// downtime once the migration completed: from the source's stop to the
	// destination guest running. XMigctlTrueDowntimeExact says it was
	// measured from both sides' CLOCK_MONOTONIC stamps (same host, same
	// boot); otherwise, on the source, it runs until the destination's
	// confirmation arrived (an upper bound).
	XMigctlTrueDowntimeUs *int64 `json:"x-migctl-true-downtime-us,omitempty"`
	// XMigctlPrepareMs (migctl extension, a destination's) is how long its
	// guest's memory took to prepare before the process was ready (guest
	// prealloc=on, QEMU's -mem-prealloc): time spent before the migration,
	// apart from the transfer.
	XMigctlPrepareMs         *int64 `json:"x-migctl-prepare-ms,omitempty"`
	XMigctlTrueDowntimeExact *bool  `json:"x-migctl-true-downtime-exact,omitempty"`
	// XMigctlRDMAProvider is a migctl extension: the RDMA provider
	// ("soft", "verbs") of a migration over rdma:, so an operator can see
	// that software RDMA was chosen (migctl serve --rdma-provider);
	// omitted for other transports. QMP clients ignore members they do
	// not know.
	XMigctlRDMAProvider string `json:"x-migctl-rdma-provider,omitempty"`
	// PostcopyBlocktime is QEMU's postcopy-blocktime (destination, with
	// the capability postcopy-blocktime): milliseconds during which every
	// vCPU was blocked on a page fault at once; PostcopyVCPUBlocktime the
	// blocked milliseconds of each vCPU; PostcopyLatency the mean time
	// from a fault to its page installed, in nanoseconds (QEMU 10.0's
	// postcopy-latency).
	// XMigctlNotConverging (migctl extension, source in precopy): the last
	// x-migctl-convergence-passes passes all expected a downtime above
	// downtime-limit; the migration will not end on its own.
	XMigctlNotConverging  bool     `json:"x-migctl-not-converging,omitempty"`
	PostcopyBlocktime     *uint32  `json:"postcopy-blocktime,omitempty"`
	PostcopyVCPUBlocktime []uint32 `json:"postcopy-vcpu-blocktime,omitempty"`
	PostcopyLatency       *uint64  `json:"postcopy-latency,omitempty"`
}

// MigrationStats is MigrationInfo's ram member (QEMU's MigrationStats).
type MigrationStats struct {
	Transferred             uint64  `json:"transferred"`
	Remaining               uint64  `json:"remaining"`
	Total                   uint64  `json:"total"`
	Duplicate               uint64  `json:"duplicate"`
	Normal                  uint64  `json:"normal"`
	NormalBytes             uint64  `json:"normal-bytes"`
	DirtyPagesRate          uint64  `json:"dirty-pages-rate"`
	Mbps                    float64 `json:"mbps"`
	DirtySyncCount          uint64  `json:"dirty-sync-count"`
	PostcopyRequests        uint64  `json:"postcopy-requests"`
	PageSize                uint64  `json:"page-size"`
	MultifdBytes            uint64  `json:"multifd-bytes"`
	PagesPerSecond          uint64  `json:"pages-per-second"`
	PrecopyBytes            uint64  `json:"precopy-bytes"`
	DowntimeBytes           uint64  `json:"downtime-bytes"`
	PostcopyBytes           uint64  `json:"postcopy-bytes"`
	DirtySyncMissedZeroCopy uint64  `json:"dirty-sync-missed-zero-copy"`
}

// SocketAddress is QEMU's SocketAddress (flat union on type).
type SocketAddress struct {
	Type string `json:"type"`
	Host string `json:"host,omitempty"`
	Port string `json:"port,omitempty"`
	Path string `json:"path,omitempty"`
	CID  string `json:"cid,omitempty"`
	Str  string `json:"str,omitempty"`
}

func ms(d time.Duration) *int64 {
	v := d.Milliseconds()
	return &v
}

func us(d time.Duration) *int64 {
	v := d.Microseconds()
	return &v
}

func ramInfo(st machine.Stats) *MigrationStats {
	return &MigrationStats{
		Transferred:    st.Transferred,
		Remaining:      st.Remaining,
		Total:          st.Total,
		Duplicate:      st.Duplicate,
		Normal:         st.Normal,
		NormalBytes:    st.NormalBytes,
		DirtyPagesRate: st.DirtyPagesRate,
		Mbps:           st.Mbps,
		DirtySyncCount: st.DirtySyncCount,
		PageSize:       st.PageSize,
		PagesPerSecond: st.PagesPerSecond,
		PrecopyBytes:   st.PrecopyBytes,
		DowntimeBytes:  st.DowntimeBytes,
		// Postcopy (source): requests served, bytes sent after the switch.
		PostcopyRequests: st.PostcopyRequests,
		PostcopyBytes:    st.PostcopyBytes,
	}
}

// blocktime fills QEMU's destination postcopy blocktime members from st,
// when the loader measured it (capability postcopy-blocktime).
func (info *MigrationInfo) blocktime(st machine.Stats) {
	if st.PostcopyBlocktime == 0 && len(st.PostcopyVCPUBlocktime) == 0 {
		return
	}
	msU32 := func(d time.Duration) uint32 { return uint32(min(d.Milliseconds(), int64(^uint32(0)))) }
	bt := msU32(st.PostcopyBlocktime)
	info.PostcopyBlocktime = &bt
	info.PostcopyVCPUBlocktime = make([]uint32, 0, len(st.PostcopyVCPUBlocktime))
	for _, d := range st.PostcopyVCPUBlocktime {
		info.PostcopyVCPUBlocktime = append(info.PostcopyVCPUBlocktime, msU32(d))
	}
	lat := uint64(max(st.PostcopyLatency, 0).Nanoseconds())
	info.PostcopyLatency = &lat
}

// migrationInfo builds query-migrate's answer from both sides' status the
// way QEMU's qmp_query_migrate does: the destination is filled first, then
// the source overrides it unless the source never started a migration.
// What each state shows is the spec's (status: and report:).
func migrationInfo(in, out machine.Status, now time.Time) *MigrationInfo {
	info := &MigrationInfo{}
	// Destination (fill_destination_migration_info).
	if in.Endpoint != nil && !in.Terminal {
		if sa, ok := socketAddress(in.Endpoint.URI); ok {
			info.SocketAddress = []SocketAddress{sa}
		}
	}
	if in.Report != spec.ReportNone {
		info.Status = in.QMPStatus
		info.ErrorDesc = peerDesc(in.Error)
		if in.Stalled > 0 {
			info.XMigctlStalledMs = ms(in.Stalled)
		}
		if in.Stats.TrueDowntime > 0 {
			exact := in.Stats.TrueDowntimeExact
			info.XMigctlTrueDowntimeUs, info.XMigctlTrueDowntimeExact = us(in.Stats.TrueDowntime), &exact
		}
		info.XMigctlRDMAProvider = in.Stats.RDMAProvider
		info.blocktime(in.Stats)
	}
	// Source (fill_source_migration_info).
	switch out.Report {
	case spec.ReportNone:
		return info
	case spec.ReportProgress, spec.ReportPostcopy, spec.ReportFinal:
		info.SetupTime = ms(out.Stats.SetupTime)
		if out.Report == spec.ReportFinal || out.Started.IsZero() {
			info.TotalTime = ms(out.Stats.TotalTime)
		} else {
			info.TotalTime = ms(now.Sub(out.Started))
		}
		if out.Report == spec.ReportProgress {
			info.ExpectedDowntime = ms(out.Stats.ExpectedDowntime)
			info.XMigctlNotConverging = out.Stats.NotConverging
		} else {
			info.Downtime = ms(out.Stats.Downtime)
		}
		info.RAM = ramInfo(out.Stats)
		if t := out.Stats.ThrottlePercent; t > 0 {
			info.CPUThrottlePercentage = &t
		}
	}
	info.Status = out.QMPStatus
	if out.Error != "" {
		info.ErrorDesc = peerDesc(out.Error)
	}
	if out.Stalled > 0 {
		info.XMigctlStalledMs = ms(out.Stalled)
	}
	if out.Report == spec.ReportFinal && out.Stats.TrueDowntime > 0 {
		exact := out.Stats.TrueDowntimeExact
		info.XMigctlTrueDowntimeUs, info.XMigctlTrueDowntimeExact = us(out.Stats.TrueDowntime), &exact
	}
	info.XMigctlRDMAProvider = out.Stats.RDMAProvider
	return info
}

// peerDesc bounds and makes printable a side's error description, which
// may quote what a migration peer sent (a guest ID, a failure reason):
// like an error reply's desc, at most MaxDesc bytes (internal/safe).
func peerDesc(s string) string { return safe.Printable(s, MaxDesc) }

// socketAddress converts a listening endpoint's URI to QEMU's
// SocketAddress; ok is false for transports that are not sockets.
func socketAddress(uri string) (SocketAddress, bool) {
	a, err := transport.Parse(uri)
	if err != nil {
		return SocketAddress{}, false
	}
	switch a.Scheme {
	case transport.SchemeTCP:
		return SocketAddress{Type: "inet", Host: a.Host, Port: strconv.Itoa(a.Port)}, true
	case transport.SchemeUnix:
		return SocketAddress{Type: "unix", Path: a.Path}, true
	case transport.SchemeVsock:
		return SocketAddress{Type: "vsock", CID: strconv.FormatUint(uint64(a.CID), 10), Port: strconv.Itoa(a.Port)}, true
	}
	return SocketAddress{}, false
}

// URI returns the address as a migration URI (tcp:HOST:PORT, unix:PATH,
// vsock:CID:PORT), or "" for a type without one.
func (sa SocketAddress) URI() string {
	switch sa.Type {
	case "inet":
		if strings.Contains(sa.Host, ":") {
			return "tcp:[" + sa.Host + "]:" + sa.Port
		}
		return "tcp:" + sa.Host + ":" + sa.Port
	case "unix":
		return "unix:" + sa.Path
	case "vsock":
		return "vsock:" + sa.CID + ":" + sa.Port
	}
	return ""
}
