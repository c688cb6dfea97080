-- Practitioners, patients and their appointments: the platform's own data.
-- Contact columns and the visit reason are never selected on the partner path.

CREATE TABLE practitioners (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    display_name text NOT NULL CHECK (length(display_name) BETWEEN 1 AND 200),
    specialty    text NOT NULL CHECK (length(specialty) BETWEEN 1 AND 200),
    create_time  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE patients (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Contact details: released to a partner only under the patient's consent.
    given_name  text NOT NULL,
    family_name text NOT NULL,
    -- The appointments.type.v1.Sex enum number (0 = not recorded).
    sex         smallint NOT NULL DEFAULT 0 CHECK (sex BETWEEN 0 AND 3),
    phone       text,
    email       text,
    create_time timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE appointments (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    practitioner_id uuid NOT NULL REFERENCES practitioners (id),
    patient_id      uuid NOT NULL REFERENCES patients (id),
    start_time      timestamptz NOT NULL,
    end_time        timestamptz NOT NULL,
    -- Health data: stored for the platform, never sent to partners.
    reason          text NOT NULL DEFAULT '',
    status          text NOT NULL DEFAULT 'booked' CHECK (status IN ('booked', 'cancelled')),
    create_time     timestamptz NOT NULL DEFAULT now(),
    update_time     timestamptz NOT NULL DEFAULT now(),
    CHECK (end_time > start_time)
);

-- The partner listing walks one practitioner's agenda in (start_time, id) order.
CREATE INDEX appointments_practitioner_start_idx ON appointments (practitioner_id, start_time, id);
CREATE INDEX appointments_patient_idx ON appointments (patient_id);
