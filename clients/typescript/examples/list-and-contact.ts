/**
 * Example partner program: list a week of appointments, then read one patient's consented contact details.
 *
 * Environment:
 *   APPTGATE_PARTNER_ADDR    the partner listener (default localhost:50051, what `make run` serves)
 *   APPTGATE_PARTNER_KEY     the partner key (required)
 *   APPTGATE_CONSENT_TOKEN   a patient's consent token for this partner (optional: no contact read without one)
 *   APPTGATE_APPOINTMENT_ID  the appointment of that patient (default: the first one listed)
 *   APPTGATE_PRACTITIONER_ID one practitioner (default: every granted one)
 *   APPTGATE_START, APPTGATE_END  the window, RFC 3339 (default: today 00:00 UTC, for 7 days)
 *
 * Prints one JSON document: {"appointments": [...], "contact": {...} | null, "denied": {...} | null}.
 * Exit status: 0 done, 3 the consent was refused (see "denied"), 1 any other failure, 2 bad usage.
 */

import { toJson } from "@bufbuild/protobuf";

import {
  ApptgateError,
  AppointmentContactSchema,
  AppointmentSchema,
  ConsentDenied,
  PartnerClient,
  type Appointment,
} from "../src/index.js";

function window(): { startTime: Date; endTime: Date } {
  const today = new Date();
  today.setUTCHours(0, 0, 0, 0);
  const startTime = process.env.APPTGATE_START ? new Date(process.env.APPTGATE_START) : today;
  const endTime = process.env.APPTGATE_END
    ? new Date(process.env.APPTGATE_END)
    : new Date(startTime.getTime() + 7 * 24 * 3600 * 1000);
  if (Number.isNaN(startTime.getTime()) || Number.isNaN(endTime.getTime())) {
    throw new RangeError("APPTGATE_START and APPTGATE_END must be RFC 3339 times");
  }
  return { startTime, endTime };
}

async function main(): Promise<number> {
  const key = process.env.APPTGATE_PARTNER_KEY ?? "";
  if (!key) {
    console.error("list-and-contact: set APPTGATE_PARTNER_KEY to your partner key");
    return 2;
  }
  let query;
  try {
    query = { ...window(), practitionerId: process.env.APPTGATE_PRACTITIONER_ID ?? "", pageSize: 100 };
  } catch (error) {
    console.error(`list-and-contact: ${(error as Error).message}`);
    return 2;
  }
  const client = new PartnerClient({ address: process.env.APPTGATE_PARTNER_ADDR || "localhost:50051", key });
  try {
    const appointments: Appointment[] = [];
    for await (const appointment of client.iterAppointments(query)) appointments.push(appointment);

    const result = {
      appointments: appointments.map((a) => toJson(AppointmentSchema, a)),
      contact: null as unknown,
      denied: null as unknown,
    };
    const token = process.env.APPTGATE_CONSENT_TOKEN ?? "";
    const appointmentId = process.env.APPTGATE_APPOINTMENT_ID || appointments[0]?.appointmentId;
    let status = 0;
    if (token && appointmentId) {
      try {
        result.contact = toJson(AppointmentContactSchema, await client.getAppointmentContact(appointmentId, token));
      } catch (error) {
        if (!(error instanceof ConsentDenied)) throw error;
        result.denied = { code: error.codeName, reason: error.reason, message: error.message };
        status = 3;
      }
    }
    console.log(JSON.stringify(result, null, 2));
    return status;
  } catch (error) {
    if (!(error instanceof ApptgateError)) throw error;
    console.error(`list-and-contact: ${error.codeName}: ${error.message} (reason ${error.reason || "none"})`);
    return 1;
  } finally {
    client.close();
  }
}

process.exitCode = await main();
