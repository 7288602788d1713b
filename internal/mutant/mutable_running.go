//go:build mutant_mutable_running

package mutant

func init() { MutableRunning = true; Active = append(Active, "mutant_mutable_running") }
