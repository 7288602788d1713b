package main

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/spec"
)

// The built-in guest's description, shared by demo and serve: one syntax,
// one set of defaults, documented here once (guestHelp, and the README's
// "The built-in guest").
const guestDefaults = "size=1G,dirty-rate=64M,seed=1,writers=1,zero=0.1,random=off"

// guestHelp is the paragraph demo and serve show in --help.
const guestHelp = "--guest describes the built-in guest as comma-separated KEY=VALUE: size (bytes of RAM, K/M/G/T\n" +
	"suffixes), dirty-rate (bytes per second its writers rewrite; 0: idle), seed (of its memory pattern),\n" +
	"writers (goroutines sharing dirty-rate), zero (fraction of pages that stay zero), random (on: fill\n" +
	"memory with incompressible bytes), uuid (the guest's UUID, QEMU's -uuid; default none), backing (anon:\n" +
	"anonymous memory with transparent huge pages, the default; memfd: shared memory another process can map),\n" +
	"prealloc (on: fault all RAM in before anything else, as QEMU's -mem-prealloc), runlog (a file to which the\n" +
	"guest appends a line, on CLOCK_MONOTONIC, each time it starts or stops; the line survives a kill). Keys left out\n" +
	"take the defaults:\n  " + guestDefaults + "\n" +
	"A source and its destination must agree on size, seed, zero and random; dirty-rate and writers may differ."

// defaultGuest is guestDefaults parsed.
func defaultGuest() guest.Config {
	cfg, err := applyGuest(guest.Config{}, guestDefaults)
	if err != nil {
		panic("guestDefaults: " + err.Error())
	}
	return cfg
}

// parseGuest reads a --guest description on top of the defaults.
func parseGuest(s string) (guest.Config, error) { return applyGuest(defaultGuest(), s) }

// applyGuest sets the keys s names on cfg.
func applyGuest(cfg guest.Config, s string) (guest.Config, error) {
	seen := map[string]bool{}
	for _, kv := range strings.Split(s, ",") {
		kv = strings.TrimSpace(kv)
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return cfg, fmt.Errorf("--guest %q: want KEY=VALUE pairs such as size=1G,dirty-rate=64M,seed=1", kv)
		}
		if seen[k] {
			return cfg, fmt.Errorf("--guest: %s given twice", k)
		}
		seen[k] = true
		var err error
		switch k {
		case "size":
			var n uint64
			n, err = spec.ParseSize(v)
			cfg.Size = int64(min(n, math.MaxInt64))
		case "dirty-rate":
			var n uint64
			n, err = spec.ParseSize(v)
			cfg.DirtyRate = int64(min(n, math.MaxInt64))
		case "seed":
			cfg.Seed, err = strconv.ParseUint(v, 0, 64)
		case "writers":
			cfg.Writers, err = strconv.Atoi(v)
		case "zero":
			cfg.ZeroFraction, err = strconv.ParseFloat(v, 64)
		case "random":
			on, ok := parseOnOff(v, false)
			if !ok {
				err = fmt.Errorf("want %s", onOffWords)
			}
			cfg.Random = on
		case "uuid":
			cfg.UUID, err = guest.ParseUUID(v)
		case "backing":
			if v != guest.BackingAnon && v != guest.BackingMemfd {
				err = fmt.Errorf("want %s or %s", guest.BackingAnon, guest.BackingMemfd)
			}
			cfg.Backing = v
		case "prealloc":
			on, ok := parseOnOff(v, false)
			if !ok {
				err = fmt.Errorf("want %s", onOffWords)
			}
			cfg.Prealloc = on
		case "runlog":
			if v == "" {
				err = errors.New("want a file path")
			}
			cfg.RunLogFile = v
		default:
			return cfg, fmt.Errorf("--guest: unknown key %q; use size, dirty-rate, seed, writers, zero, random, uuid, backing, prealloc or runlog", k)
		}
		if err != nil {
			return cfg, fmt.Errorf("--guest %s=%s: %w", k, v, err)
		}
	}
	return cfg, checkGuest(cfg)
}

// checkGuest checks what guest.New would refuse, before any memory is
// prepared, with the flag's words.
func checkGuest(cfg guest.Config) error {
	switch {
	case cfg.Size <= 0 || cfg.Size%guest.PageSize != 0:
		return fmt.Errorf("--guest size=%d: want a positive multiple of %d bytes, e.g. 256M", cfg.Size, guest.PageSize)
	case cfg.Writers < 0 || cfg.Writers > guest.MaxWriters:
		return fmt.Errorf("--guest writers=%d: want 1..%d", cfg.Writers, guest.MaxWriters)
	case math.IsNaN(cfg.ZeroFraction) || cfg.ZeroFraction < 0 || cfg.ZeroFraction > 1:
		return fmt.Errorf("--guest zero=%v: want a fraction in 0..1", cfg.ZeroFraction)
	}
	return nil
}

// formatGuest is cfg as a --guest description (every key), which
// applyGuest reads back to cfg.
func formatGuest(cfg guest.Config) string {
	random := "off"
	if cfg.Random {
		random = "on"
	}
	desc := fmt.Sprintf("size=%d,dirty-rate=%d,seed=%d,writers=%d,zero=%s,random=%s",
		cfg.Size, cfg.DirtyRate, cfg.Seed, cfg.Writers, strconv.FormatFloat(cfg.ZeroFraction, 'g', -1, 64), random)
	if cfg.UUID != (guest.UUID{}) {
		desc += ",uuid=" + cfg.UUID.String()
	}
	if cfg.Backing != "" {
		desc += ",backing=" + cfg.Backing
	}
	if cfg.Prealloc {
		desc += ",prealloc=on"
	}
	return desc
}

// guestFlags is --guest and the demo's older spellings of its keys, kept
// as aliases because benchmarks and scripts use them.
type guestFlags struct {
	desc      string
	size      string
	dirtyRate string
	seed      uint64
	zero      float64
	random    bool
	aliases   bool // the alias flags are registered
}

func (f *guestFlags) add(cmd *cobra.Command, aliases bool) {
	cmd.Flags().StringVar(&f.desc, "guest", "", "the built-in guest: `size=…,dirty-rate=…,seed=…[,writers=…][,zero=…][,random=on]` (default "+guestDefaults+")")
	if !aliases {
		return
	}
	f.aliases = true
	cmd.Flags().StringVar(&f.size, "size", "", "alias of --guest size=`BYTES`")
	cmd.Flags().StringVar(&f.dirtyRate, "dirty-rate", "", "alias of --guest dirty-rate=`BYTES`")
	cmd.Flags().Uint64Var(&f.seed, "seed", 0, "alias of --guest seed=`N`")
	cmd.Flags().Float64Var(&f.zero, "zero-fraction", 0, "alias of --guest zero=`FRACTION`")
	cmd.Flags().BoolVar(&f.random, "random", false, "alias of --guest random=on")
}

// config is the guest the flags describe: the defaults, then --guest,
// then the aliases given (a key given both ways is an error).
func (f *guestFlags) config(cmd *cobra.Command) (guest.Config, error) {
	desc := f.desc
	if f.aliases {
		var extra []string
		add := func(flag, key, val string) {
			if cmd.Flags().Changed(flag) {
				extra = append(extra, key+"="+val)
			}
		}
		add("size", "size", f.size)
		add("dirty-rate", "dirty-rate", f.dirtyRate)
		add("seed", "seed", strconv.FormatUint(f.seed, 10))
		add("zero-fraction", "zero", strconv.FormatFloat(f.zero, 'g', -1, 64))
		if cmd.Flags().Changed("random") {
			extra = append(extra, "random="+strconv.FormatBool(f.random))
		}
		for _, e := range extra {
			k, _, _ := strings.Cut(e, "=")
			for _, kv := range strings.Split(desc, ",") {
				if strings.HasPrefix(strings.TrimSpace(kv), k+"=") {
					return guest.Config{}, errors.New("--guest " + k + "= and its alias flag are both given: keep one")
				}
			}
		}
		if len(extra) > 0 {
			if desc != "" {
				desc += ","
			}
			desc += strings.Join(extra, ",")
		}
	}
	return parseGuest(desc)
}
