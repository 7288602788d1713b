package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/internal/safe"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/qmp"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
	"github.com/migctl/migctl/vmm"
)

// addQMPCommands adds `migctl serve` (a QMP server hosting the built-in
// guest) and the client commands that talk to it: incoming, migrate,
// status, info, set-cap, set-param, cancel, migrate-continue, stop, cont,
// events and qmp.
func addQMPCommands(root *cobra.Command) {
	root.AddCommand(qmpServeCmd(), qmpIncomingCmd(), qmpMigrateCmd(), qmpStatusCmd(),
		qmpSetCapCmd(), qmpSetParamCmd(), qmpCancelCmd(), qmpEventsCmd(), qmpRawCmd())
	root.AddCommand(runStateCmds()...)
	root.AddCommand(qmpInfoCmd())
}

func qmpServeCmd() *cobra.Command {
	var addrs []string
	var guestSpec string
	var dest, paused bool
	var sf serveFlags
	cmd := &cobra.Command{
		Use:   "serve --qmp unix:PATH [--qmp tcp:HOST:PORT] [--guest size=1G,dirty-rate=64M,seed=1] [--destination [--reattach unix:SOCKET]] [-S] [--migration-dir DIR] [--qmp-tls-creds DIR] [--fd N]...",
		Short: "Host the built-in guest and serve QMP, as a QEMU process does",
		Long: "serve hosts the built-in guest and answers QMP (the QEMU Machine Protocol) on the given sockets, so that\n" +
			"QMP clients (and migctl's own migrate, incoming, status... commands) drive its migrations.\n\n" +
			"Without --destination the guest runs (a source). With --destination the guest is empty and waits for\n" +
			"migrate-incoming (QEMU's -incoming defer). Source and destination need the same --guest size and seed.\n" +
			"With -S (QEMU's -S) the guest does not run on its own: a source waits for cont before its guest first\n" +
			"runs; a destination completes its migration with the guest paused, until cont.\n" +
			"The unix socket is created with mode 0600; a TCP address must be loopback. serve runs until the QMP\n" +
			"command quit, SIGINT or SIGTERM, and removes its sockets. It exits with status 1 when an incoming\n" +
			"migration started with exit-on-error (the default) fails.\n\n" + guestHelp + "\n" + postcopyHelp + serveHelp,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if len(addrs) == 0 {
				return usagef("give at least one --qmp unix:PATH or --qmp tcp:127.0.0.1:PORT to serve on")
			}
			rest, pd, err := cutPostcopy(guestSpec)
			if err != nil {
				return &usageError{err: err}
			}
			cfg, err := parseGuest(rest)
			if err != nil {
				return &usageError{err: err}
			}
			if sf.reattach != "" {
				switch {
				case !dest:
					return usagef("--reattach: only a destination reattaches to a guest process; add --destination")
				case guestSpec != "":
					return usagef("--reattach: the guest is the guest process's (its size, seed and readers): drop --guest")
				case paused:
					return usagef("--reattach: the guest process's guest runs or not as it did; drop -S")
				}
			}
			if pd.postcopy && cfg.Prealloc && dest {
				return usagef("--guest postcopy=on,prealloc=on: a postcopy destination's RAM must stay holes until each page arrives; drop prealloc")
			}
			return qmpRunServe(cmd, addrs, cfg, dest, paused, pd, &sf)
		},
	}
	sf.add(cmd)
	cmd.Flags().StringArrayVar(&addrs, "qmp", nil, "QMP `ADDRESS` to serve on: unix:PATH or tcp:HOST:PORT (repeatable)")
	cmd.Flags().StringVar(&guestSpec, "guest", "", "the built-in guest: `size=…,dirty-rate=…,seed=…[,writers=…][,zero=…][,random=on]` (default "+guestDefaults+")")
	cmd.Flags().BoolVar(&dest, "destination", false, "host an empty guest that waits for an incoming migration")
	cmd.Flags().BoolVarP(&paused, "paused", "S", false, "the guest does not run until cont (QEMU's -S): a source starts stopped, a destination stays paused when its migration arrives")
	return cmd
}

// servedGuest is what serve needs of its guest: the built-in guest in
// this process, or a guest process (postcopy=on).
type servedGuest interface {
	guest.Guest
	Start() error
}

func qmpRunServe(cmd *cobra.Command, addrs []string, cfg guest.Config, dest, paused bool, pd procDesc, sf *serveFlags) error {
	postcopy := pd.postcopy
	// Descriptors inherited at startup are declared before anything else
	// is opened.
	fds := qmp.NewFDTable()
	defer fds.Close()
	if err := sf.inherit(fds); err != nil {
		return err
	}
	qopts, err := sf.options()
	if err != nil {
		return err
	}
	lopts, err := sf.listenOptions(addrs)
	if err != nil {
		return err
	}
	s, err := loadSpec(cmd, nil)
	if err != nil {
		printSpecErrors(cmd.ErrOrStderr(), err)
		return &exitError{code: 1}
	}
	holds, err := sf.holdPoints(s)
	if err != nil {
		return &usageError{err: err}
	}
	var g servedGuest
	var digest func() (uint64, error)
	var guestSock string // the guest process's control socket, printed in the banner
	reattach := sf.reattach != ""
	switch {
	case postcopy || reattach:
		var pg *guestProcess
		var err error
		if reattach {
			pg, err = attachGuestProcess(cmd, sf.reattach)
			postcopy = true
		} else {
			pg, err = startGuestProcess(cmd, cfg, pd, dest)
		}
		if err != nil {
			return err
		}
		defer pg.stop()
		guestSock = pg.socket
		g = pg.c
		digest = func() (uint64, error) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			return pg.c.Checksum(ctx)
		}
	default:
		var b *guest.Builtin
		if dest {
			b, err = guest.NewDestination(cfg)
		} else {
			b, err = guest.New(cfg)
		}
		if err != nil {
			return err
		}
		defer b.Close()
		g, digest = b, b.Checksum
	}
	log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	if !dest && !paused {
		if err := g.Start(); err != nil {
			return err
		}
	}
	objs := creds.NewObjects()
	c, err := serveController(s, g, dest, paused, postcopy, objs, holds)
	if err != nil {
		return err
	}
	defer c.Close()
	exitCh := make(chan error, 1)
	// fd: addresses are resolved from the server's descriptor table only.
	tc := &transport.Config{Descriptors: fds, RDMAProvider: sf.rdmaProvider}
	h := vmm.New(c, g, vmm.Options{
		// The objects QMP's object-add makes: tls-creds and tls-authz name them.
		Engine: engine.Options{Transport: tc, Probe: tc.Probe, Logger: log, Creds: objs},
		Loader: loaders.Options{Transport: tc, Probe: tc.Probe, Logger: log, Creds: objs},
		Exit: func(err error) {
			select {
			case exitCh <- err:
			default:
			}
		},
		Logger: log,
	})
	defer h.Close()
	if holds != nil {
		defer holds.Close() // before h.Close: a held migration must not delay shutdown
	}
	qopts.Logger, qopts.Objects, qopts.FDs, qopts.Digest, qopts.Holds = log, objs, fds, digest, holds
	if u, ok := guest.UUIDOf(g); ok {
		qopts.UUID = u.String()
	}
	if p, ok := g.(interface{ PrepareTime() time.Duration }); ok {
		qopts.PrepareTime = p.PrepareTime() // the built-in guest's -mem-prealloc; a guest process reports none
	}
	srv := qmp.NewServer(c, h, qopts)
	defer srv.Close()
	if reattach {
		// none → postcopy-paused before any QMP client can look. The
		// configuration freezes there: MIGRATION events are on (capability
		// events), so that the operator sees the recovery through.
		if err := c.SetCapabilities(context.Background(), map[string]bool{"events": true}); err != nil {
			return fmt.Errorf("--reattach %s: %w", sf.reattach, err)
		}
		if err := h.Reattach(context.Background()); err != nil {
			return fmt.Errorf("--reattach %s: %w", sf.reattach, err)
		}
	}
	for _, a := range addrs {
		lo := qmp.ListenOptions{}
		if strings.HasPrefix(a, "tcp:") {
			lo = lopts
		}
		addr, err := srv.ListenWith(a, lo)
		if err != nil {
			return err
		}
		shown := a
		if strings.HasPrefix(a, "tcp:") {
			shown = "tcp:" + addr.String()
		}
		role := "source guest running"
		if postcopy {
			role = "source guest running in its guest process"
		}
		switch {
		case reattach:
			role = "destination guest process " + guestSock + " reattached: postcopy-paused, waiting for migrate-recover"
		case dest && paused:
			role = "destination guest waiting for migrate-incoming, paused when it arrives (-S)"
		case dest && postcopy:
			role = "destination guest process (postcopy=on) waiting for migrate-incoming"
		case dest:
			role = "destination guest waiting for migrate-incoming"
		case paused:
			role = "source guest stopped until cont (-S)"
		}
		if guestSock != "" && !reattach {
			role += ", guest process socket " + guestSock
		}
		fmt.Fprintf(cmd.OutOrStdout(), "serving QMP on %s (%s)\n", shown, role)
	}
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	select {
	case <-srv.Done():
		return nil
	case <-ctx.Done():
		return nil
	case err := <-exitCh:
		fmt.Fprintln(cmd.ErrOrStderr(), "migctl serve:", err)
		return &exitError{code: 1}
	}
}

// qmpSocketFlag adds -s/--socket to a client command.
func qmpSocketFlag(cmd *cobra.Command) *string {
	var sock string
	cmd.Flags().StringVarP(&sock, "socket", "s", os.Getenv("MIGCTL_SOCKET"),
		"QMP `SOCKET` of a migctl serve: PATH, unix:PATH or tcp:HOST:PORT (default $MIGCTL_SOCKET)")
	return &sock
}

// qmpConnect dials the server for a client command.
func qmpConnect(cmd *cobra.Command, sock string) (*qmp.Client, context.Context, error) {
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	if sock == "" {
		return nil, ctx, usagef("give the QMP socket of `migctl serve` with -s PATH (or set MIGCTL_SOCKET)")
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cl, err := qmp.DialAddr(dctx, sock)
	return cl, ctx, err
}

// qmpFail prints a server's error as the server gave it (bounded and made
// printable: the server may be another program, or quote a peer) and
// turns any error into exit status 1.
func qmpFail(cmd *cobra.Command, err error) error {
	var qe *qmp.Error
	if errors.As(err, &qe) {
		fmt.Fprintln(cmd.ErrOrStderr(), serverText(qe.Desc))
		return &exitError{code: 1}
	}
	return err
}

// qmpClientCmd builds a client command: it connects, runs fn, and reports
// a QMP error as the server gave it.
func qmpClientCmd(use, short, long string, args cobra.PositionalArgs, fn func(cmd *cobra.Command, ctx context.Context, cl *qmp.Client, args []string) error) *cobra.Command {
	var sock *string
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Long:  long,
		Args:  args,
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, ctx, err := qmpConnect(cmd, *sock)
			if err != nil {
				return err
			}
			defer cl.Close()
			return qmpFail(cmd, fn(cmd, ctx, cl, args))
		},
	}
	sock = qmpSocketFlag(cmd)
	return cmd
}

func qmpIncomingCmd() *cobra.Command {
	var exitOnError bool
	cmd := qmpClientCmd("incoming URI", "Make a destination listen for an incoming migration (QMP migrate-incoming)",
		"incoming sends migrate-incoming to a `migctl serve --destination`. URI is tcp:HOST:PORT (port 0 picks a\n"+
			"free one: see `migctl status`), unix:PATH, file:PATH, exec:CMD or fd:N. With --exit-on-error (the\n"+
			"default, as in QEMU) the destination process exits if the migration fails.",
		cobra.ExactArgs(1),
		func(cmd *cobra.Command, ctx context.Context, cl *qmp.Client, args []string) error {
			if _, err := cl.Execute(ctx, "migrate-incoming", map[string]any{"uri": args[0], "exit-on-error": exitOnError}); err != nil {
				return err
			}
			info, err := qmpQueryMigrate(ctx, cl)
			if err != nil {
				return err
			}
			for _, sa := range info.SocketAddress {
				fmt.Fprintf(cmd.OutOrStdout(), "listening on %s\n", sa.URI())
			}
			if len(info.SocketAddress) == 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "listening on %s\n", args[0])
			}
			return nil
		})
	cmd.Flags().BoolVar(&exitOnError, "exit-on-error", true, "end the destination process if the incoming migration fails")
	return cmd
}

func qmpQueryMigrate(ctx context.Context, cl *qmp.Client) (qmp.MigrationInfo, error) {
	var info qmp.MigrationInfo
	raw, err := cl.Execute(ctx, "query-migrate", nil)
	if err != nil {
		return info, err
	}
	err = json.Unmarshal(raw, &info)
	return info, err
}

func qmpMigrateCmd() *cobra.Command {
	var capArgs, paramArgs []string
	var noWait bool
	cmd := qmpClientCmd("migrate URI [--cap NAME=on|off]... [--param NAME=VALUE]... [--no-wait]",
		"Start a migration on a source (QMP migrate) and follow it to the end",
		"migrate sets the given capabilities and parameters, sends migrate to a `migctl serve`, then prints\n"+
			"progress on stderr (a bar on a terminal: RAM sent this pass, rate, remaining, pass, expected downtime,\n"+
			"ETA) until the migration ends, and the outcome on stdout. Exit status 0 only when it completed; 1 when\n"+
			"it failed or was cancelled (the error is printed); 130 when interrupted (the migration goes on).\n"+
			"At pre-switchover (capability pause-before-switchover) it says what to type to continue.\n"+
			"--no-wait returns once the migration started.",
		cobra.ExactArgs(1),
		func(cmd *cobra.Command, ctx context.Context, cl *qmp.Client, args []string) error {
			if len(capArgs) > 0 {
				c, err := qmpCapsArgs(capArgs)
				if err != nil {
					return err
				}
				if _, err := cl.Execute(ctx, "migrate-set-capabilities", c); err != nil {
					return err
				}
			}
			if len(paramArgs) > 0 {
				p, err := qmpTypedParams(ctx, cl, paramArgs)
				if err != nil {
					return err
				}
				if _, err := cl.Execute(ctx, "migrate-set-parameters", p); err != nil {
					return err
				}
			}
			if _, err := cl.Execute(ctx, "migrate", map[string]any{"uri": args[0]}); err != nil {
				return err
			}
			if noWait {
				fmt.Fprintf(cmd.OutOrStdout(), "migration to %s started\n", args[0])
				return nil
			}
			return qmpFollow(cmd, ctx, cl)
		})
	cmd.Flags().StringArrayVar(&capArgs, "cap", nil, "set a capability first: `NAME=on|off` (repeatable; also yes|no, true|false)")
	cmd.Flags().StringArrayVar(&paramArgs, "param", nil, "set a parameter first: `NAME=VALUE` (repeatable; sizes take K/M/G)")
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "return once the migration started")
	return cmd
}

// qmpFollow polls query-migrate and renders the progress (the one
// renderer, on stderr) until the migration ends, then prints the outcome
// on stdout. At pre-switchover it tells the operator what to type; after a
// completed migration that left the source's guest paused it says how to
// resume it. An interrupt stops following, not the migration.
func qmpFollow(cmd *cobra.Command, ctx context.Context, cl *qmp.Client) error {
	sock, _ := cmd.Flags().GetString("socket")
	pr := newProgress(cmd.ErrOrStderr(), quiet(cmd), false)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	hinted := false
	for {
		info, err := qmpQueryMigrate(ctx, cl)
		if err != nil {
			pr.finish(false)
			if ctx.Err() != nil {
				return qmpStoppedFollowing(cmd, sock)
			}
			return err
		}
		pr.update(snapFromInfo(info))
		switch info.Status {
		case "pre-switchover":
			if !hinted {
				hinted = true
				pr.note("paused in pre-switchover (capability pause-before-switchover is on): the source's guest is stopped before\n"+
					"its last pass. Switch over with:\n    migctl migrate-continue -s %s pre-switchover\nor give up (the guest runs on here) with:\n    migctl cancel -s %s", sock, sock)
			}
		case "completed":
			pr.finish(true)
			fmt.Fprintln(cmd.OutOrStdout(), qmpOutcome(info))
			var rs qmp.RunState
			if r, err := cl.Execute(ctx, "query-status", nil); err == nil && json.Unmarshal(r, &rs) == nil && !rs.Running && rs.Status != "" {
				fmt.Fprintf(cmd.ErrOrStderr(), "the source's guest is paused (%s), as QEMU leaves it after a migration. Run it here again with:\n"+
					"    migctl cont -s %s\nor end the source process with:\n    migctl qmp -s %s '{\"execute\":\"quit\"}'\n", rs.Status, sock, sock)
			}
			return nil
		case "failed", "cancelled":
			pr.finish(false)
			msg := "migration " + info.Status
			if info.ErrorDesc != "" {
				msg += ": " + serverText(info.ErrorDesc)
			}
			fmt.Fprintln(cmd.ErrOrStderr(), msg)
			return &exitError{code: exitFailed}
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			pr.finish(false)
			return qmpStoppedFollowing(cmd, sock)
		case <-cl.Done():
			pr.finish(false)
			return fmt.Errorf("lost the QMP connection: %w", cl.Err())
		}
	}
}

func qmpStoppedFollowing(cmd *cobra.Command, sock string) error {
	fmt.Fprintf(cmd.ErrOrStderr(), "stopped following; the migration goes on (see `migctl status -s %s`, stop it with `migctl cancel -s %s`)\n", sock, sock)
	return errInterrupted
}

// snapFromInfo is query-migrate's answer as a progress reading.
func snapFromInfo(info qmp.MigrationInfo) progressSnap {
	s := progressSnap{Status: info.Status}
	if r := info.RAM; r != nil {
		s.Pass, s.Transferred, s.Remaining, s.Total = r.DirtySyncCount, r.Transferred, r.Remaining, r.Total
		s.Rate = r.Mbps * 1e6 / 8 // QEMU's mbps: megabits per second
	}
	if info.ExpectedDowntime != nil {
		s.ExpectedDowntime = time.Duration(*info.ExpectedDowntime) * time.Millisecond
	}
	return s
}

// qmpOutcome is the one line migrate prints when the migration ended.
func qmpOutcome(info qmp.MigrationInfo) string {
	var b strings.Builder
	fmt.Fprintf(&b, "migration %s", info.Status)
	if r := info.RAM; r != nil {
		fmt.Fprintf(&b, ": %s sent", formatBytes(r.Transferred))
		if info.TotalTime != nil && *info.TotalTime > 0 {
			secs := float64(*info.TotalTime) / 1000
			fmt.Fprintf(&b, " in %.1f s (%s)", secs, formatRate(float64(r.Transferred)/secs))
		}
		fmt.Fprintf(&b, ", %d passes", r.DirtySyncCount)
	}
	if info.Downtime != nil {
		fmt.Fprintf(&b, ", downtime %d ms", *info.Downtime)
	}
	return b.String()
}

// qmpCapsArgs turns NAME=on|off into migrate-set-capabilities arguments.
func qmpCapsArgs(kvs []string) (map[string]any, error) {
	var list []map[string]any
	for _, kv := range kvs {
		name, on, err := parseCapArg(kv)
		if err != nil {
			return nil, &usageError{err: err}
		}
		list = append(list, map[string]any{"capability": name, "state": on})
	}
	return map[string]any{"capabilities": list}, nil
}

// qmpTypedParams turns NAME=VALUE into migrate-set-parameters arguments
// with the JSON types the server expects, learnt from
// query-migrate-parameters (numbers take K/M/G suffixes). Unknown names
// are sent as strings for the server to refuse.
func qmpTypedParams(ctx context.Context, cl *qmp.Client, kvs []string) (map[string]any, error) {
	raw, err := cl.Execute(ctx, "query-migrate-parameters", nil)
	if err != nil {
		return nil, err
	}
	var cur map[string]json.RawMessage
	if err := json.Unmarshal(raw, &cur); err != nil {
		return nil, err
	}
	out := map[string]any{}
	for _, kv := range kvs {
		name, val, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("parameter %q: want NAME=VALUE", kv)
		}
		r, known := cur[name]
		var kind byte
		if known && len(r) > 0 {
			kind = r[0]
		}
		switch {
		case name == "block-bitmap-mapping":
			if !json.Valid([]byte(val)) {
				return nil, fmt.Errorf("parameter %s: want its JSON list of node aliases", name)
			}
			out[name] = json.RawMessage(val)
		case kind == 't' || kind == 'f':
			on, ok := parseOnOff(val, false)
			if !ok {
				return nil, usagef("parameter %s: want %s, got %q", name, onOffWords, val)
			}
			out[name] = on
		case kind >= '0' && kind <= '9':
			n, err := spec.ParseSize(val)
			if err != nil {
				return nil, fmt.Errorf("parameter %s: %v", name, err)
			}
			out[name] = n
		case kind == '[':
			out[name] = strings.Fields(val)
		default:
			out[name] = val
		}
	}
	return out, nil
}

func qmpStatusCmd() *cobra.Command {
	var format string
	cmd := qmpClientCmd("status [-o json]", "Show the migration's state and statistics (QMP query-migrate)",
		"status prints query-migrate as a table, with the state of migctl's machine on each side beside QEMU's\n"+
			"status (a destination listening shows QEMU's setup), or with -o json query-migrate as the server\n"+
			"returned it. `migctl info` shows capabilities, parameters and the permitted triggers.",
		cobra.NoArgs,
		func(cmd *cobra.Command, ctx context.Context, cl *qmp.Client, _ []string) error {
			raw, err := cl.Execute(ctx, "query-migrate", nil)
			if err != nil {
				return err
			}
			switch format {
			case "json":
				var v any
				if err := json.Unmarshal(raw, &v); err != nil {
					return err
				}
				b, _ := json.MarshalIndent(v, "", "  ")
				fmt.Fprintln(cmd.OutOrStdout(), string(b))
				return nil
			case "", "table":
			default:
				return usagef("-o %q: want table or json", format)
			}
			var info qmp.MigrationInfo
			if err := json.Unmarshal(raw, &info); err != nil {
				return err
			}
			var rs qmp.RunState
			if r, err := cl.Execute(ctx, "query-status", nil); err == nil {
				_ = json.Unmarshal(r, &rs)
			}
			var mi *qmp.MachineInfo
			if r, err := cl.Execute(ctx, "query-migctl-machine", map[string]any{"history": 0}); err == nil {
				mi = &qmp.MachineInfo{}
				if json.Unmarshal(r, mi) != nil {
					mi = nil
				}
			}
			qmpPrintStatus(cmd.OutOrStdout(), info, rs, mi)
			return nil
		})
	cmd.Flags().StringVarP(&format, "output", "o", "table", "output `FORMAT`: table or json")
	return cmd
}

// qmpPrintStatus prints query-migrate, with migctl's machine states (mi,
// nil for a server without query-migctl-machine) beside QEMU's status.
func qmpPrintStatus(w io.Writer, info qmp.MigrationInfo, rs qmp.RunState, mi *qmp.MachineInfo) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	defer tw.Flush()
	status := info.Status
	if status == "" {
		status = "none (no migration has run)"
	}
	fmt.Fprintf(tw, "status\t%s\n", status)
	if mi != nil {
		fmt.Fprintf(tw, "machine\tincoming %s, outgoing %s\n", mi.Incoming.State, mi.Outgoing.State)
	}
	if rs.Status != "" {
		fmt.Fprintf(tw, "guest\t%s\n", rs.Status)
	}
	for _, sa := range info.SocketAddress {
		fmt.Fprintf(tw, "listening on\t%s\n", sa.URI())
	}
	if p := info.XMigctlRDMAProvider; p != "" {
		fmt.Fprintf(tw, "rdma provider\t%s\n", p)
	}
	msField := func(name string, v *int64) {
		if v != nil {
			fmt.Fprintf(tw, "%s\t%d ms\n", name, *v)
		}
	}
	msField("total time", info.TotalTime)
	msField("setup time", info.SetupTime)
	msField("expected downtime", info.ExpectedDowntime)
	msField("downtime", info.Downtime)
	if r := info.RAM; r != nil {
		fmt.Fprintf(tw, "transferred\t%s\n", formatBytes(r.Transferred))
		fmt.Fprintf(tw, "remaining\t%s\n", formatBytes(r.Remaining))
		fmt.Fprintf(tw, "total\t%s\n", formatBytes(r.Total))
		fmt.Fprintf(tw, "throughput\t%s (%.1f Mbps)\n", formatRate(r.Mbps*1e6/8), r.Mbps)
		fmt.Fprintf(tw, "pass (dirty-sync-count)\t%d\n", r.DirtySyncCount)
		fmt.Fprintf(tw, "pages: normal / zero\t%d / %d\n", r.Normal, r.Duplicate)
		fmt.Fprintf(tw, "dirty pages rate\t%d pages/s\n", r.DirtyPagesRate)
	}
	if info.ErrorDesc != "" {
		fmt.Fprintf(tw, "error\t%s\n", serverText(info.ErrorDesc))
	}
}

// serverText bounds and makes printable a text a QMP server sent before it
// reaches the terminal: migctl serve already does so, but the client may
// be talking to any QMP server (internal/safe).
func serverText(s string) string { return safe.Printable(s, qmp.MaxDesc) }

func qmpSetCapCmd() *cobra.Command {
	cmd := qmpClientCmd("set-cap NAME=on|off...", "Set migration capabilities, all or nothing (QMP migrate-set-capabilities)",
		"set-cap switches capabilities on or off in one migrate-set-capabilities: either all change or none.",
		cobra.MinimumNArgs(1),
		func(cmd *cobra.Command, ctx context.Context, cl *qmp.Client, args []string) error {
			c, err := qmpCapsArgs(args)
			if err != nil {
				return err
			}
			_, err = cl.Execute(ctx, "migrate-set-capabilities", c)
			return err
		})
	return cmd
}

func qmpSetParamCmd() *cobra.Command {
	cmd := qmpClientCmd("set-param NAME=VALUE...", "Set migration parameters, all or nothing (QMP migrate-set-parameters)",
		"set-param sets parameters in one migrate-set-parameters: either all change or none. Sizes take K/M/G.",
		cobra.MinimumNArgs(1),
		func(cmd *cobra.Command, ctx context.Context, cl *qmp.Client, args []string) error {
			p, err := qmpTypedParams(ctx, cl, args)
			if err != nil {
				return err
			}
			_, err = cl.Execute(ctx, "migrate-set-parameters", p)
			return err
		})
	return cmd
}

func qmpCancelCmd() *cobra.Command {
	cmd := qmpClientCmd("cancel", "Cancel the running migration (QMP migrate_cancel)",
		"cancel sends migrate_cancel: the source's migration is cancelled and its guest keeps running; a\n"+
			"destination still waiting for its source stops listening. Harmless when nothing runs.",
		cobra.NoArgs,
		func(cmd *cobra.Command, ctx context.Context, cl *qmp.Client, _ []string) error {
			_, err := cl.Execute(ctx, "migrate_cancel", nil)
			return err
		})
	return cmd
}

func qmpEventsCmd() *cobra.Command {
	cmd := qmpClientCmd("events", "Print QMP events as JSON lines until interrupted",
		"events prints every event (MIGRATION, MIGRATION_PASS) the server sends, one JSON object per line,\n"+
			"until interrupted or the server goes away. Events are sent only while the capability events is on\n"+
			"(`migctl set-cap events=on`).",
		cobra.NoArgs,
		func(cmd *cobra.Command, ctx context.Context, cl *qmp.Client, _ []string) error {
			out := cmd.OutOrStdout()
			// On stderr, so that stdout stays JSON lines: from here on no
			// event is missed.
			fmt.Fprintln(cmd.ErrOrStderr(), "migctl events: connected; printing events until interrupted")
			for {
				select {
				case ev, ok := <-cl.Events():
					if !ok {
						return fmt.Errorf("the QMP connection ended: %w", cl.Err())
					}
					b, _ := json.Marshal(ev)
					fmt.Fprintln(out, string(b))
				case <-ctx.Done():
					return nil
				}
			}
		})
	return cmd
}

func qmpRawCmd() *cobra.Command {
	cmd := qmpClientCmd(`qmp '{"execute":…}'`, "Send one raw QMP request and print the reply",
		"qmp sends the JSON request as given (after capabilities negotiation) and prints the server's reply\n"+
			"line. Exit status 1 when the reply is an error.",
		cobra.ExactArgs(1),
		func(cmd *cobra.Command, ctx context.Context, cl *qmp.Client, args []string) error {
			line, err := cl.Raw(ctx, []byte(args[0]))
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), string(line))
			var r struct {
				Error *qmp.Error `json:"error"`
			}
			if json.Unmarshal(line, &r) == nil && r.Error != nil {
				return &exitError{code: 1}
			}
			return nil
		})
	return cmd
}
