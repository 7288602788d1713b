//go:build mutant_keep_endpoint

package mutant

func init() { KeepEndpoint = true; Active = append(Active, "mutant_keep_endpoint") }
