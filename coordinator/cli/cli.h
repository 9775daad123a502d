// The meshlm subcommands: each takes the arguments after its name and returns a process exit code.
#ifndef MESHLM_CLI_H
#define MESHLM_CLI_H

int cmd_run(int argc, char **argv);        // generate text (cmd_run.c)
int cmd_bench(int argc, char **argv);      // llama-bench-like speed table (cmd_bench.c)
int cmd_inspect(int argc, char **argv);    // print GGUF metadata and tensors (cmd_inspect.c)
int cmd_gen_model(int argc, char **argv);  // write a seeded random GGUF (cmd_gen_model.c)
int cmd_plan(int argc, char **argv);       // print a tensor-parallel shard table (cmd_plan.c)
int cmd_worker(int argc, char **argv);     // serve shards to a coordinator (cmd_worker.c)
int cmd_coordinator(int argc, char **argv); // run with remote workers: `run` that requires --workers (cmd_run.c)
int cmd_mpi(int argc, char **argv);        // tensor-parallel generation under mpirun (cmd_mpi.c)
int cmd_nodes(int argc, char **argv);      // list the members of a node registry (cmd_nodes.c)
int cmd_chaos(int argc, char **argv);      // a workload under a fault schedule, against fault-free (cmd_chaos.c)
int cmd_keygen(int argc, char **argv);     // a CurveZMQ key pair (cmd_keygen.c)
int cmd_serve(int argc, char **argv);      // the OpenAI-compatible HTTP API (cmd_serve.c)
int cmd_kvstore(int argc, char **argv);    // a node's KV cache in files, attention next to it (cmd_kvstore.c)

#endif
