//! `services`: prints the mesh's services, one a line (`name probe_port role [store]`), from the
//! one list in `flowmesh_common::services`. Scripts read the services they start, and the
//! queues they clean up, from here.

fn main() {
    print!("{}", flowmesh_common::services::listing());
}
