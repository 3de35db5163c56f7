extension StateStore {
    /// Every schema change in order. A store is migrated when opened; a migration is never
    /// edited once released, only followed by a new one. The SQL is SQLite's; PostgreSQL's
    /// differs in column types only (`StoreMigration.postgresTypes`).
    static let migrations: [StoreMigration] = [
        StoreMigration(
            "v1",
            """
            CREATE TABLE pool (
                name TEXT PRIMARY KEY NOT NULL,
                spec TEXT NOT NULL,
                generation INTEGER NOT NULL,
                updatedAt DOUBLE NOT NULL
            );
            CREATE TABLE vm (
                id TEXT PRIMARY KEY NOT NULL,
                pool TEXT NOT NULL,
                state TEXT NOT NULL,
                boot TEXT NOT NULL,
                vcpus INTEGER NOT NULL,
                memoryMiB INTEGER NOT NULL,
                maxVcpus INTEGER NOT NULL,
                maxMemoryMiB INTEGER NOT NULL,
                kernel TEXT NOT NULL,
                initrd TEXT,
                cmdline TEXT NOT NULL,
                pid INTEGER,
                templateId TEXT,
                createdAt DOUBLE NOT NULL,
                updatedAt DOUBLE NOT NULL,
                lastError TEXT
            );
            CREATE INDEX vm_pool ON vm(pool);
            CREATE TABLE template (
                id TEXT PRIMARY KEY NOT NULL,
                pool TEXT NOT NULL,
                key TEXT NOT NULL,
                state TEXT NOT NULL,
                createdAt DOUBLE NOT NULL
            );
            CREATE INDEX template_pool ON template(pool);
            CREATE TABLE journal (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                operation TEXT NOT NULL,
                pool TEXT NOT NULL,
                vm TEXT,
                template TEXT,
                startedAt DOUBLE NOT NULL,
                finishedAt DOUBLE,
                outcome TEXT,
                error TEXT,
                ownerPid INTEGER NOT NULL
            );
            CREATE INDEX journal_open ON journal(finishedAt) WHERE finishedAt IS NULL;
            CREATE TABLE event (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                at DOUBLE NOT NULL,
                pool TEXT NOT NULL,
                vm TEXT,
                kind TEXT NOT NULL,
                message TEXT NOT NULL
            );
            CREATE INDEX event_pool ON event(pool, id);
            """),
        // A delete interrupted halfway is finished by the next pass, not undone.
        StoreMigration(
            "v2-pool-deleting", "ALTER TABLE pool ADD COLUMN deleting INTEGER NOT NULL DEFAULT 0"),
        // Standbys: hypervisor processes started ahead of clones (the VM cache).
        StoreMigration(
            "v3-standby",
            """
            CREATE TABLE standby (
                id TEXT PRIMARY KEY NOT NULL,
                pool TEXT NOT NULL,
                template TEXT NOT NULL,
                pid INTEGER,
                ready INTEGER NOT NULL DEFAULT 0,
                createdAt DOUBLE NOT NULL
            );
            CREATE INDEX standby_template ON standby(template, ready);
            """),
        // The whole shape (disks, network, image identity) as JSON; the flat columns stay for
        // readers of older state dirs.
        StoreMigration(
            "v4-vm-shape", "ALTER TABLE vm ADD COLUMN shape TEXT"),
        // Networks and leases: what a VM was given (forwarded ports, an address) is allocated in
        // tables whose keys make double allocation impossible, and freed with the VM's row.
        StoreMigration(
            "v5-network-lease",
            """
            ALTER TABLE vm ADD COLUMN network TEXT;
            ALTER TABLE vm ADD COLUMN leaseHolder TEXT;
            ALTER TABLE vm ADD COLUMN leasedAt DOUBLE;
            ALTER TABLE vm ADD COLUMN leaseExpiresAt DOUBLE;
            CREATE TABLE hostport (
                port INTEGER PRIMARY KEY NOT NULL,
                vm TEXT NOT NULL,
                guest INTEGER NOT NULL
            );
            CREATE INDEX hostport_vm ON hostport(vm);
            CREATE TABLE address (
                bridge TEXT NOT NULL,
                address INTEGER NOT NULL,
                vm TEXT NOT NULL,
                PRIMARY KEY (bridge, address)
            );
            CREATE INDEX address_vm ON address(vm);
            CREATE TABLE bridge (
                name TEXT PRIMARY KEY NOT NULL,
                subnet TEXT NOT NULL,
                createdByVmpool INTEGER NOT NULL
            );
            CREATE TABLE leasewait (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                pool TEXT NOT NULL,
                holder TEXT NOT NULL,
                pid INTEGER NOT NULL,
                since DOUBLE NOT NULL
            );
            CREATE INDEX leasewait_pool ON leasewait(pool, id);
            """),
        // Many hosts on one store: host-scoped rows name their host ('' on a single-host
        // store), host ports, addresses and bridges are per host, and the cluster's hosts and
        // the placement of each pool's VMs on them are tables of their own.
        StoreMigration(
            "v6-hosts",
            """
            ALTER TABLE vm ADD COLUMN host TEXT NOT NULL DEFAULT '';
            CREATE INDEX vm_host ON vm(host, pool);
            ALTER TABLE template ADD COLUMN host TEXT NOT NULL DEFAULT '';
            ALTER TABLE standby ADD COLUMN host TEXT NOT NULL DEFAULT '';
            ALTER TABLE journal ADD COLUMN host TEXT NOT NULL DEFAULT '';
            ALTER TABLE event ADD COLUMN host TEXT NOT NULL DEFAULT '';
            ALTER TABLE leasewait ADD COLUMN host TEXT NOT NULL DEFAULT '';
            ALTER TABLE leasewait ADD COLUMN seenAt DOUBLE NOT NULL DEFAULT 0;
            ALTER TABLE pool ADD COLUMN unplaced INTEGER NOT NULL DEFAULT 0;
            CREATE TABLE hostport_v6 (
                host TEXT NOT NULL DEFAULT '',
                port INTEGER NOT NULL,
                vm TEXT NOT NULL,
                guest INTEGER NOT NULL,
                PRIMARY KEY (host, port)
            );
            INSERT INTO hostport_v6 (port, vm, guest) SELECT port, vm, guest FROM hostport;
            DROP TABLE hostport;
            ALTER TABLE hostport_v6 RENAME TO hostport;
            CREATE INDEX hostport_vm ON hostport(vm);
            CREATE TABLE address_v6 (
                host TEXT NOT NULL DEFAULT '',
                bridge TEXT NOT NULL,
                address INTEGER NOT NULL,
                vm TEXT NOT NULL,
                PRIMARY KEY (host, bridge, address)
            );
            INSERT INTO address_v6 (bridge, address, vm) SELECT bridge, address, vm FROM address;
            DROP TABLE address;
            ALTER TABLE address_v6 RENAME TO address;
            CREATE INDEX address_vm ON address(vm);
            CREATE TABLE bridge_v6 (
                host TEXT NOT NULL DEFAULT '',
                name TEXT NOT NULL,
                subnet TEXT NOT NULL,
                createdByVmpool INTEGER NOT NULL,
                PRIMARY KEY (host, name)
            );
            INSERT INTO bridge_v6 (name, subnet, createdByVmpool) SELECT name, subnet, createdByVmpool FROM bridge;
            DROP TABLE bridge;
            ALTER TABLE bridge_v6 RENAME TO bridge;
            CREATE TABLE host (
                name TEXT PRIMARY KEY NOT NULL,
                epoch INTEGER NOT NULL,
                vcpus INTEGER NOT NULL,
                memoryMiB INTEGER NOT NULL,
                heartbeatAt DOUBLE NOT NULL,
                registeredAt DOUBLE NOT NULL,
                fencedAt DOUBLE
            );
            CREATE TABLE placement (
                pool TEXT NOT NULL,
                host TEXT NOT NULL,
                size INTEGER NOT NULL,
                warm INTEGER NOT NULL,
                PRIMARY KEY (pool, host)
            );
            """),
        // Fresh leases: a VM someone entered (exec, cp, console) while it was not leased is never
        // leased; the next pass replaces it.
        StoreMigration(
            "v7-vm-entered",
            """
            ALTER TABLE vm ADD COLUMN enteredAt DOUBLE;
            ALTER TABLE vm ADD COLUMN enteredBy TEXT;
            """),
        // When a template's state was saved (it became ready), apart from when its build was
        // recorded: the build takes seconds, and `describe pool` shows the save.
        StoreMigration(
            "v8-template-saved",
            """
            ALTER TABLE template ADD COLUMN savedAt DOUBLE;
            """),
    ]
}
