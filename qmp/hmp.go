package qmp

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// This file adds human-monitor-command: QEMU's HMP tunnelled through QMP,
// for the commands an operator types about migration. Each answer has the
// text QEMU prints (migration/migration-hmp-cmds.c, hmp_info_migrate,
// hmp_info_migrate_capabilities, hmp_info_migrate_parameters;
// hmp_info_status), so QEMU's own `qmp-shell -H` works against migctl
// serve. Like QEMU, the result is the monitor's output, lines ending in
// CRLF; a command HMP does not know is a successful reply saying so, and a
// command that fails prints "Error: …".
//
// Known differences: the "globals:" block QEMU prints first in `info
// migrate` (machine properties such as store-global-state) is left out,
// since migctl has no such properties; `info migrate_parameters` prints the
// parameters QEMU prints, in its order, followed by any the spec declares
// that QEMU's list lacks.

func init() {
	register("human-monitor-command", command{run: cmdHMP})
}

// hmpCommand is one HMP command: its name (aliases joined by '|', as
// QEMU's help shows them), argument synopsis, help text and handler.
type hmpCommand struct {
	name, params, help string
	run                func(s *Server, args []string) (string, error)
}

// hmpCommands and hmpInfo are filled in init: help refers back to them.
var hmpCommands, hmpInfo []hmpCommand

func init() {
	hmpCommands = []hmpCommand{
		{"help|?", "[cmd]", "show the help", hmpHelp},
		{"info", "[subcommand]", "show various information about the system state", hmpInfoCmd},
		{"stop", "", "stop emulation", func(s *Server, _ []string) (string, error) { return "", s.h.Stop(s.ctx) }},
		{"cont|c", "", "resume emulation", func(s *Server, _ []string) (string, error) { return "", s.h.Cont(s.ctx) }},
		{"migrate_cancel", "", "cancel the current VM migration", func(s *Server, _ []string) (string, error) { return "", s.h.Cancel(s.ctx) }},
		{"migrate_continue", "state", "Continue migration from the given paused state", hmpContinue},
	}
	hmpInfo = []hmpCommand{
		{"migrate", "", "show migration status", hmpInfoMigrate},
		{"migrate_capabilities", "", "show current migration capabilities", hmpInfoCapabilities},
		{"migrate_parameters", "", "show current migration parameters", hmpInfoParameters},
		{"status", "", "show the current VM status (running|paused)", hmpInfoStatus},
		{"version", "", "show the version of QEMU", hmpInfoVersion},
	}
}

// hmpMaxCommandLine bounds command-line; an HMP line is short.
const hmpMaxCommandLine = 4096

func cmdHMP(s *Server, _ *client, a *args) (any, func(), error) {
	line, _ := a.str("command-line", true)
	a.integer("cpu-index", 0) // accepted; migctl's guest has no CPUs to pick
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	if len(line) > hmpMaxCommandLine {
		return nil, nil, genericf("Parameter 'command-line' is longer than %d bytes", hmpMaxCommandLine)
	}
	out, err := hmpRun(s, strings.Fields(line), hmpCommands, "")
	if err != nil {
		out += "Error: " + s.qmpError(err).Desc + "\n"
	}
	return strings.ReplaceAll(out, "\n", "\r\n"), nil, nil
}

// hmpFind returns the command named name (or one of its aliases).
func hmpFind(table []hmpCommand, name string) *hmpCommand {
	for i := range table {
		if slices.Contains(strings.Split(table[i].name, "|"), name) {
			return &table[i]
		}
	}
	return nil
}

// hmpRun runs words against table; prefix is the words already consumed
// ("info " for the info table), for QEMU's "unknown command" text.
func hmpRun(s *Server, words []string, table []hmpCommand, prefix string) (string, error) {
	if len(words) == 0 {
		return "", nil
	}
	c := hmpFind(table, words[0])
	if c == nil {
		return fmt.Sprintf("unknown command: '%s%s'\n", prefix, words[0]), nil
	}
	return c.run(s, words[1:])
}

// hmpList is QEMU's help listing: "NAME PARAMS -- HELP" per command.
func hmpList(table []hmpCommand, prefix string) string {
	var b strings.Builder
	for _, c := range table {
		fmt.Fprintf(&b, "%s%s %s -- %s\n", prefix, c.name, c.params, c.help)
	}
	return b.String()
}

func hmpHelp(_ *Server, args []string) (string, error) {
	if len(args) == 0 {
		return hmpList(hmpCommands, ""), nil
	}
	if args[0] == "info" {
		return hmpList(hmpInfo, "info "), nil
	}
	if c := hmpFind(hmpCommands, args[0]); c != nil {
		return hmpList([]hmpCommand{*c}, ""), nil
	}
	return fmt.Sprintf("unknown command: '%s'\n", args[0]), nil
}

func hmpInfoCmd(s *Server, args []string) (string, error) {
	if len(args) == 0 {
		return hmpList(hmpInfo, "info "), nil
	}
	return hmpRun(s, args, hmpInfo, "info ")
}

func hmpContinue(s *Server, args []string) (string, error) {
	if len(args) != 1 {
		return "", genericf("migrate_continue takes one argument: the paused state, e.g. pre-switchover")
	}
	if !slices.Contains(migrationStatuses, args[0]) {
		return "", genericf("Invalid parameter '%s'", args[0])
	}
	return "", s.h.Continue(s.ctx, args[0])
}

func hmpInfoMigrate(s *Server, _ []string) (string, error) {
	in, err := s.c.Status(spec.Incoming, 0)
	if err != nil {
		return "", err
	}
	out, err := s.c.Status(spec.Outgoing, 0)
	if err != nil {
		return "", err
	}
	return formatInfoMigrate(migrationInfo(in, out, time.Now())), nil
}

// formatInfoMigrate is QEMU's `info migrate` text for info, without the
// globals block.
func formatInfoMigrate(info *MigrationInfo) string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	if info.Status != "" {
		p("Migration status: %s", info.Status)
		if info.Status == "failed" && info.ErrorDesc != "" {
			p(" (%s)\n", info.ErrorDesc)
		} else {
			p("\n")
		}
		var total int64
		if info.TotalTime != nil {
			total = *info.TotalTime
		}
		p("total time: %d ms\n", total)
		if info.ExpectedDowntime != nil {
			p("expected downtime: %d ms\n", *info.ExpectedDowntime)
		}
		if info.Downtime != nil {
			p("downtime: %d ms\n", *info.Downtime)
		}
		if info.SetupTime != nil {
			p("setup: %d ms\n", *info.SetupTime)
		}
	}
	if r := info.RAM; r != nil {
		p("transferred ram: %d kbytes\n", r.Transferred>>10)
		p("throughput: %0.2f mbps\n", r.Mbps)
		p("remaining ram: %d kbytes\n", r.Remaining>>10)
		p("total ram: %d kbytes\n", r.Total>>10)
		p("duplicate: %d pages\n", r.Duplicate)
		p("normal: %d pages\n", r.Normal)
		p("normal bytes: %d kbytes\n", r.NormalBytes>>10)
		p("dirty sync count: %d\n", r.DirtySyncCount)
		p("page size: %d kbytes\n", r.PageSize>>10)
		p("multifd bytes: %d kbytes\n", r.MultifdBytes>>10)
		p("pages-per-second: %d\n", r.PagesPerSecond)
		if r.DirtyPagesRate != 0 {
			p("dirty pages rate: %d pages\n", r.DirtyPagesRate)
		}
		if r.PostcopyRequests != 0 {
			p("postcopy request count: %d\n", r.PostcopyRequests)
		}
		if r.PrecopyBytes != 0 {
			p("precopy ram: %d kbytes\n", r.PrecopyBytes>>10)
		}
		if r.DowntimeBytes != 0 {
			p("downtime ram: %d kbytes\n", r.DowntimeBytes>>10)
		}
		if r.PostcopyBytes != 0 {
			p("postcopy ram: %d kbytes\n", r.PostcopyBytes>>10)
		}
	}
	if info.CPUThrottlePercentage != nil {
		p("cpu throttle percentage: %d\n", *info.CPUThrottlePercentage)
	}
	if len(info.SocketAddress) > 0 {
		p("socket address: [\n")
		for _, sa := range info.SocketAddress {
			p("\t%s\n", sa.URI())
		}
		p("]\n")
	}
	return b.String()
}

func hmpInfoCapabilities(s *Server, _ []string) (string, error) {
	cfg := s.c.Config()
	var b strings.Builder
	for _, c := range s.c.Spec().Capabilities {
		fmt.Fprintf(&b, "%s: %s\n", c.Name, onOff(cfg.Caps[c.Name]))
	}
	return b.String(), nil
}

func onOff(v bool) string {
	if v {
		return "on"
	}
	return "off"
}

// hmpParamFormats lists the parameters QEMU's `info migrate_parameters`
// prints, in its order, with how it prints each value: "" plain, "ms",
// "bytes", "bytes/second", "MB/s" appended after a space, "'" quoted,
// "bool" as on/off, "map" for block-bitmap-mapping (only when set).
var hmpParamFormats = []struct{ name, format string }{
	{"announce-initial", "ms"}, {"announce-max", "ms"}, {"announce-rounds", ""}, {"announce-step", "ms"},
	{"throttle-trigger-threshold", ""}, {"cpu-throttle-initial", ""}, {"cpu-throttle-increment", ""},
	{"cpu-throttle-tailslow", "bool"}, {"max-cpu-throttle", ""}, {"tls-creds", "'"}, {"tls-hostname", "'"},
	{"max-bandwidth", "bytes/second"}, {"avail-switchover-bandwidth", "bytes/second"}, {"downtime-limit", "ms"},
	{"x-checkpoint-delay", "ms"}, {"multifd-channels", ""}, {"multifd-compression", ""},
	{"zero-page-detection", ""}, {"xbzrle-cache-size", "bytes"}, {"max-postcopy-bandwidth", ""},
	{"tls-authz", "'"}, {"block-bitmap-mapping", "map"}, {"x-vcpu-dirty-limit-period", "ms"},
	{"vcpu-dirty-limit", "MB/s"}, {"mode", ""}, {"direct-io", "bool"},
}

// hmpParamsNotShown are parameters QEMU's `info migrate_parameters` does
// not print.
var hmpParamsNotShown = map[string]bool{
	"multifd-zlib-level": true, "multifd-zstd-level": true, "multifd-qatzip-level": true, "cpr-exec-command": true,
}

func hmpInfoParameters(s *Server, _ []string) (string, error) {
	sp := s.c.Spec()
	cfg := s.c.Config()
	var b strings.Builder
	shown := map[string]bool{}
	line := func(name, format string) {
		shown[name] = true
		v := cfg.Params[name]
		switch format {
		case "":
			fmt.Fprintf(&b, "%s: %s\n", name, v)
		case "'":
			fmt.Fprintf(&b, "%s: '%s'\n", name, v)
		case "bool":
			fmt.Fprintf(&b, "%s: %s\n", name, onOff(v == "true"))
		case "map":
			if v != "" {
				fmt.Fprintf(&b, "%s:\n%s", name, formatBitmapMapping(v))
			}
		default:
			fmt.Fprintf(&b, "%s: %s %s\n", name, v, format)
		}
	}
	for _, f := range hmpParamFormats {
		if sp.Parameter(f.name) != nil {
			line(f.name, f.format)
		}
	}
	for i := range sp.Parameters {
		p := &sp.Parameters[i]
		if shown[p.Name] || hmpParamsNotShown[p.Name] {
			continue
		}
		format := ""
		if p.Type == spec.TypeBool {
			format = "bool"
		}
		line(p.Name, format)
	}
	return b.String(), nil
}

// formatBitmapMapping prints block-bitmap-mapping's JSON as QEMU's HMP
// does: "  'node' -> 'alias'" with each bitmap indented below.
func formatBitmapMapping(text string) string {
	var nodes []struct {
		NodeName string `json:"node-name"`
		Alias    string `json:"alias"`
		Bitmaps  []struct {
			Name  string `json:"name"`
			Alias string `json:"alias"`
		} `json:"bitmaps"`
	}
	if json.Unmarshal([]byte(text), &nodes) != nil {
		return "  " + text + "\n"
	}
	var b strings.Builder
	for _, n := range nodes {
		fmt.Fprintf(&b, "  '%s' -> '%s'\n", n.NodeName, n.Alias)
		for _, bm := range n.Bitmaps {
			fmt.Fprintf(&b, "    '%s' -> '%s'\n", bm.Name, bm.Alias)
		}
	}
	return b.String()
}

func hmpInfoStatus(s *Server, _ []string) (string, error) {
	st, err := s.c.Status(spec.Guest, 0)
	if err != nil {
		return "", err
	}
	running := st.State == machine.GuestRunning
	text := "VM status: paused"
	if running {
		text = "VM status: running"
	}
	if !running && st.QMPStatus != "paused" {
		text += " (" + st.QMPStatus + ")"
	}
	return text + "\n", nil
}

func hmpInfoVersion(s *Server, _ []string) (string, error) {
	v := newVersion(s.opts.Package)
	return fmt.Sprintf("%d.%d.%d (%s)\n", v.QEMU.Major, v.QEMU.Minor, v.QEMU.Micro, v.Package), nil
}
