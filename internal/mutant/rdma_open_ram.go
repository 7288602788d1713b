//go:build mutant_rdma_open_ram

package mutant

func init() { RDMAOpenRAM = true; Active = append(Active, "mutant_rdma_open_ram") }
