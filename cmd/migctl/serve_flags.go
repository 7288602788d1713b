package main

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/host"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/qmp"
	"github.com/migctl/migctl/rdma"
	"github.com/migctl/migctl/spec"
	_ "github.com/migctl/migctl/vsock" // registers vsock: with transport
)

// serveFlags are `migctl serve`'s options beyond --qmp, --guest and
// --destination: the control server's limits, its trust boundary and the
// descriptors inherited at startup.
type serveFlags struct {
	maxClients, maxPending int
	negotiation            time.Duration
	migrationDir           string
	tlsCreds               string
	tlsAllow               []string
	fds                    []int
	rdmaProvider           string
	reattach               string // --reattach unix:SOCKET of a guest process
	// Test-only (hidden): hold points and how long each holds.
	holds       []string
	holdTimeout time.Duration
}

func (f *serveFlags) add(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.IntVar(&f.maxClients, "qmp-max-clients", qmp.DefaultMaxClients, "`N` QMP clients connected at once; one more is told so and disconnected")
	fl.IntVar(&f.maxPending, "qmp-max-pending", qmp.DefaultMaxPending, "`N` QMP clients connected but not yet through qmp_capabilities; one more drops the one that waited longest")
	fl.DurationVar(&f.negotiation, "qmp-negotiation-timeout", qmp.DefaultNegotiationTimeout, "`DURATION` a QMP client has from connecting to a successful qmp_capabilities (and its TLS handshake)")
	fl.StringVar(&f.migrationDir, "migration-dir", "", "`DIR` under which clients of an unauthenticated TCP QMP socket may use unix: and file: migration addresses (writable by this user only)")
	fl.StringVar(&f.tlsCreds, "qmp-tls-creds", "", "tls-creds-x509 `DIR` (ca-cert.pem, server-cert.pem, server-key.pem) making clients of the tcp: QMP sockets authenticate with a certificate signed by ca-cert.pem")
	fl.StringArrayVar(&f.tlsAllow, "qmp-tls-allow", nil, "with --qmp-tls-creds, accept only client certificates whose distinguished name matches this `GLOB` (QEMU's DN form, e.g. 'C=GB,O=Example,CN=*'; repeatable)")
	fl.IntSliceVar(&f.fds, "fd", nil, "descriptor N inherited from the parent, usable (once) as fd:N in migrate or migrate-incoming (repeatable); other numbers are refused")
	// Test-only, hidden: the fault matrix (reliability/) holds a side as
	// it enters a state, applies a fault, then releases it with QMP
	// x-migctl-release (qmp.Holds).
	fl.StringArrayVar(&f.holds, "x-hold", nil, "test only: hold the goroutine that makes a side enter a state (`SIDE:STATE`), the first time, until QMP x-migctl-release (announced by the X_MIGCTL_HOLD event; repeatable)")
	fl.DurationVar(&f.holdTimeout, "x-hold-timeout", time.Minute, "test only: how long (`DURATION`) --x-hold holds without x-migctl-release")
	_ = fl.MarkHidden("x-hold")
	_ = fl.MarkHidden("x-hold-timeout")
	addRDMAProviderFlag(fl, &f.rdmaProvider)
	fl.StringVar(&f.reattach, "reattach", "", "with --destination: take over the guest process listening on `unix:SOCKET` whose serve died during postcopy "+
		"(its memfd RAM, userfaultfd and received-page bitmap); the migration waits in postcopy-paused for migrate-recover and the source's migrate resume=true")
}

// holdPoints returns the --x-hold points checked against the spec, or nil
// when none was given.
func (f *serveFlags) holdPoints(s *spec.Spec) (*qmp.Holds, error) {
	if len(f.holds) == 0 {
		return nil, nil
	}
	h, err := qmp.NewHolds(s, f.holds, f.holdTimeout)
	if err != nil {
		return nil, fmt.Errorf("--x-hold: %w", err)
	}
	return h, nil
}

// addRDMAProviderFlag adds --rdma-provider (serve and demo).
func addRDMAProviderFlag(fl *pflag.FlagSet, p *string) {
	fl.StringVar(p, "rdma-provider", rdma.DefaultProvider, "the RDMA provider `NAME` rdma: addresses run on: verbs (an RDMA device through rdma-core) or soft (RDMA's semantics in software over TCP); "+
		"never a fallback: where verbs finds no device, rdma: migrations fail with its probe's reason until soft is chosen")
}

// checkRDMAProvider refuses a provider name the registry does not know,
// before anything is opened (whether its device works is probed when an
// rdma: address is used).
func checkRDMAProvider(name string) error {
	if !slices.Contains(rdma.Providers(), name) {
		return usagef("--rdma-provider %q: want one of %s", name, strings.Join(rdma.Providers(), ", "))
	}
	return nil
}

// serveHelp documents the flags above in serve's long help.
const serveHelp = "\n\nTrust: the unix socket is created with mode 0600 (only its owner and root can connect) and refused in a\n" +
	"directory others can write to unless it has the sticky bit; its clients may do everything. A tcp: socket must\n" +
	"be on a loopback address. Without --qmp-tls-creds every local user can connect to it: serve warns, and those\n" +
	"clients get network migrations (tcp:, rdma:, vsock:), fd:NAME, and unix:/file: only under --migration-dir,\n" +
	"never exec: or another path. With --qmp-tls-creds its clients must present a certificate signed by\n" +
	"ca-cert.pem (and matching a --qmp-tls-allow glob when given) and may do everything.\n\n" +
	"RDMA: rdma: addresses run on --rdma-provider, verbs by default (an RDMA device through rdma-core; a binary\n" +
	"built without -tags rdma_verbs, or a host without a device, fails each rdma: migration saying so) or soft\n" +
	"(RDMA's semantics in software, over TCP). migctl never falls back from one to the other; query-migrate names\n" +
	"the provider in x-migctl-rdma-provider.\n\n" +
	"Descriptors: clients of the unix socket pass descriptors with getfd (SCM_RIGHTS) and use them as fd:NAME.\n" +
	"fd:N works only for a descriptor declared with --fd N, which must be inherited from serve's parent (open and\n" +
	"not close-on-exec when serve starts), never one of migctl's own.\n\n" +
	"Limits: --qmp-max-clients (default 256), --qmp-max-pending (default 16) and --qmp-negotiation-timeout\n" +
	"(default 30s) bound what idle or hostile connections cost."

// options returns the QMP server's options and checks the migration
// directory.
func (f *serveFlags) options() (qmp.Options, error) {
	o := qmp.Options{MaxClients: f.maxClients, MaxPending: f.maxPending, NegotiationTimeout: f.negotiation}
	if err := checkRDMAProvider(f.rdmaProvider); err != nil {
		return o, err
	}
	switch {
	case f.maxClients < 1:
		return o, fmt.Errorf("--qmp-max-clients %d: want at least 1", f.maxClients)
	case f.maxPending < 1:
		return o, fmt.Errorf("--qmp-max-pending %d: want at least 1", f.maxPending)
	case f.negotiation <= 0:
		return o, fmt.Errorf("--qmp-negotiation-timeout %v: want a positive duration", f.negotiation)
	}
	if f.migrationDir != "" {
		dir, err := qmp.CheckMigrationDir(f.migrationDir)
		if err != nil {
			return o, err
		}
		o.MigrationDir = dir
	}
	return o, nil
}

// listenOptions returns the options of the tcp: QMP listeners.
func (f *serveFlags) listenOptions(addrs []string) (qmp.ListenOptions, error) {
	var lo qmp.ListenOptions
	if f.tlsCreds == "" {
		if len(f.tlsAllow) > 0 {
			return lo, errors.New("--qmp-tls-allow needs --qmp-tls-creds")
		}
		return lo, nil
	}
	if !slicesAny(addrs, func(a string) bool { return strings.HasPrefix(a, "tcp:") }) {
		return lo, errors.New("--qmp-tls-creds applies to tcp: QMP addresses, and none was given")
	}
	x, err := creds.LoadX509(creds.X509Options{ID: "qmp-tls", Dir: f.tlsCreds, Endpoint: creds.Server})
	if err != nil {
		return lo, fmt.Errorf("--qmp-tls-creds: %w", err)
	}
	lo.TLS = x
	if len(f.tlsAllow) > 0 {
		rules := make([]creds.Rule, len(f.tlsAllow))
		for i, g := range f.tlsAllow {
			rules[i] = creds.Rule{Match: g, Policy: creds.Allow, Format: creds.Glob}
		}
		l, err := creds.NewList("qmp-tls-allow", creds.Deny, rules)
		if err != nil {
			return lo, fmt.Errorf("--qmp-tls-allow: %w", err)
		}
		lo.Authz = l
	}
	return lo, nil
}

// inherit declares the --fd descriptors in the server's table. serve
// calls it before it opens anything.
func (f *serveFlags) inherit(t *qmp.FDTable) error {
	for _, n := range f.fds {
		if err := t.Inherit(n); err != nil {
			return err
		}
	}
	return nil
}

func slicesAny(s []string, f func(string) bool) bool {
	for _, x := range s {
		if f(x) {
			return true
		}
	}
	return false
}

// serveController builds serve's controller: the facts the connect guard
// compares (page size, guest identity, and the guest's UUID when it has
// one) and the object registry the tls-objects guard looks at.
func serveController(s *spec.Spec, g guest.Guest, dest, paused, postcopy bool, objs *creds.Objects, holds *qmp.Holds) (*machine.Controller, error) {
	ps := "4096"
	if bs := g.Blocks(); len(bs) > 0 {
		ps = strconv.Itoa(bs[0].PageSize)
	}
	facts := map[string]string{"page-size": ps, "guest": g.ID()}
	var onEnter func(machine.Trigger, machine.Outcome)
	if holds != nil {
		onEnter = holds.Enter
	}
	if u, ok := guest.UUIDOf(g); ok {
		facts["uuid"] = u.String() // compared at connect when the source sends its UUID
	}
	feats := host.Features()
	if postcopy {
		// The vCPUs run in the guest process, which registered its RAM
		// with userfaultfd before they ran (rule postcopy-ram/needs-guest-process).
		feats["userfault-guest"] = true
	}
	return machine.New(s, machine.Options{
		Features: feats,
		Facts:    facts,
		Incoming: dest,
		Paused:   paused,
		Objects:  qmp.GuardObjects(objs),
		OnEnter:  onEnter,
	})
}
