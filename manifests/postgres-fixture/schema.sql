-- Loaded once into the template; every clone starts with it.
CREATE TABLE jobs (
    id serial PRIMARY KEY,
    name text NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
);
INSERT INTO jobs (name) VALUES ('fixture');
CREATE ROLE ci LOGIN;
GRANT ALL ON jobs TO ci;
GRANT USAGE ON SEQUENCE jobs_id_seq TO ci;
