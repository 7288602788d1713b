//go:build mutant_lossy_events

package mutant

func init() { LossyEvents = true; Active = append(Active, "mutant_lossy_events") }
