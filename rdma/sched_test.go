package rdma

import "runtime"

func runtimeGosched() { runtime.Gosched() }
