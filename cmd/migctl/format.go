package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// formatBytes is the one byte formatter of the command line: IEC units,
// at most one decimal, none when it is zero ("1 GiB", "1.5 GiB",
// "12.3 MiB", "512 B").
func formatBytes(n uint64) string {
	units := []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	if n < 1024 {
		return fmt.Sprintf("%d B", n)
	}
	v, u := float64(n)/1024, 0
	for v >= 1024 && u < len(units)-1 {
		v /= 1024
		u++
	}
	s := strconv.FormatFloat(v, 'f', 1, 64)
	if strings.HasSuffix(s, ".0") {
		s = s[:len(s)-2]
	}
	return s + " " + units[u]
}

// formatRate formats bytes per second.
func formatRate(bps float64) string {
	if bps < 0 {
		bps = 0
	}
	return formatBytes(uint64(bps)) + "/s"
}

// formatDuration rounds a duration for people: ms below a second, then
// seconds with one decimal, then whole seconds past ten minutes.
func formatDuration(d time.Duration) string {
	switch {
	case d < time.Second:
		return fmt.Sprintf("%d ms", d.Milliseconds())
	case d < 10*time.Minute:
		return fmt.Sprintf("%.1f s", d.Seconds())
	}
	return d.Round(time.Second).String()
}

// parseOnOff reads a boolean flag value with the one vocabulary every
// command accepts: on/off, yes/no, true/false (any case). missing says the
// value was left out (NAME alone), which means on.
func parseOnOff(v string, missing bool) (on, ok bool) {
	switch strings.ToLower(v) {
	case "on", "yes", "true":
		return true, true
	case "off", "no", "false":
		return false, true
	case "":
		return true, missing
	}
	return false, false
}

// onOffWords is how usage texts and errors name the vocabulary.
const onOffWords = "on|off (also yes|no, true|false)"

// parseCapArg parses --cap NAME[=VALUE].
func parseCapArg(s string) (name string, on bool, err error) {
	name, val, hasVal := strings.Cut(s, "=")
	if name == "" {
		return "", false, fmt.Errorf("--cap %q: want NAME=%s", s, onOffWords)
	}
	on, ok := parseOnOff(val, !hasVal)
	if !ok {
		return "", false, fmt.Errorf("--cap %s: want %s, got %q", name, onOffWords, val)
	}
	return name, on, nil
}
